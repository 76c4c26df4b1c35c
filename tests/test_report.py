"""RESULTS.md names every figure; no figure in figures/ is orphaned; verdicts read the results."""

import json

from pkm_ref import bench, report, stats


def test_every_committed_figure_is_registered():
    committed = {p.stem for p in (report.ROOT / "figures").rglob("*.png")}
    assert committed - set(report.FIGURES) == set(), "register these in pkm_ref/report.py"


def test_every_registered_figure_has_a_known_section():
    assert {f.section for f in report.FIGURES.values()} <= set(report.SECTIONS)
    assert set(report.TABLES.values()) <= set(report.SECTIONS)


def _write(folder, name, rows, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta or {}, "rows": rows}))


def retrieval_rows(times: dict[tuple[str, int], list[float]]) -> list[dict]:
    """bench_retrieval rows as the bench writes them: one time per round, combined."""
    rounds = len(next(iter(times.values())))
    return bench.combine_rounds([
        [bench._row(case, slots, None if ms[i] is None else bench.Timing(ms[i] / 1e3, 0.0, 2))
         for (case, slots), ms in times.items()]
        for i in range(rounds)
    ])  # fmt: skip


GROWING_FLAT = {
    ("flat keys", 4096): [10.0, 10.2, 9.8], ("product keys", 4096): [5.0, 5.1, 4.9],
    ("flat keys", 2**20): [2560.0, 2600.0, 2520.0], ("product keys", 2**20): [6.0, 6.1, 5.9],
}  # fmt: skip


def test_results_name_every_figure_and_judge_the_claims(tmp_path):
    _write(tmp_path, "bench_retrieval", retrieval_rows(GROWING_FLAT))
    (tmp_path / "bench_retrieval.png").write_bytes(b"png")
    (tmp_path / "stray_plot.png").write_bytes(b"png")
    text = report.write_results("smoke", tmp_path).read_text()
    assert "256x slower" in text and "**agrees**" in text and "95 % interval" in text
    assert "## Unregistered figures" in text and "stray_plot.png" in text
    for name in report.FIGURES:
        assert f"### {name}" in text


def test_retrieval_verdict_is_within_noise_when_the_rounds_disagree(tmp_path):
    """Flat keys 8x, 12x and 20x slower against product keys 1x: the growth ratio's interval
    straddles the claim's 10x."""
    times = {
        ("flat keys", 4096): [1.0, 1.0, 1.0], ("product keys", 4096): [1.0, 1.0, 1.0],
        ("flat keys", 2**20): [8.0, 12.0, 20.0], ("product keys", 2**20): [1.0, 1.0, 1.0],
    }  # fmt: skip
    _write(tmp_path, "bench_retrieval", retrieval_rows(times))
    assert report._retrieval_verdict(tmp_path).status == "within noise"
    times[("flat keys", 2**20)] = [3.0, 3.1, 2.9]  # 3x: clearly below 10x
    _write(tmp_path, "bench_retrieval", retrieval_rows(times))
    assert report._retrieval_verdict(tmp_path).status == "does not agree"


def test_retrieval_verdict_skips_sizes_where_flat_keys_were_not_timed(tmp_path):
    """Above the flat-key limit the bench writes a flat row with no time; the verdict spans the
    sizes where both searches ran, and says so when there are fewer than two."""
    times = {
        ("flat keys", 4096): [10.0, 10.0], ("product keys", 4096): [5.0, 5.0],
        ("flat keys", 2**16): [160.0, 160.0], ("product keys", 2**16): [5.5, 5.5],
        ("flat keys", 2**20): [None, None], ("product keys", 2**20): [6.0, 6.0],
    }  # fmt: skip
    _write(tmp_path, "bench_retrieval", retrieval_rows(times))
    verdict = report._retrieval_verdict(tmp_path)
    assert "From 4,096 to 65,536 slots (16x)" in verdict.text and "16x slower" in verdict.text
    del times[("flat keys", 2**16)], times[("product keys", 2**16)], times[("flat keys", 4096)]
    _write(tmp_path, "bench_retrieval", retrieval_rows(times))
    verdict = report._retrieval_verdict(tmp_path)
    assert verdict.status is None and "fewer than two sizes" in verdict.text


def lm_rows(memory_bpb: list[float], memory_speed: list[float], deep_speed: list[float]):
    def estimate(values):
        return stats.Estimate.of(values).to_json()

    return [
        {"model": model, "role": role, "memory_slots": slots, "test_bpb": estimate(bpb),
         "infer_tok_s": estimate(infer), "train_tok_s": estimate([v / 10 for v in infer])}
        for model, role, slots, bpb, infer in [
            ("dense-2L", "shallow", 0, [2.0, 2.01, 1.99], [100.0, 101.0, 99.0]),
            ("dense-4L", "deep", 0, [1.8, 1.81, 1.79], deep_speed),
            ("pkm-2L-n64", "memory", 4096, memory_bpb, memory_speed),
        ]
    ]  # fmt: skip


def test_lm_verdict_says_when_the_claim_fails_or_is_within_noise(tmp_path):
    fast, slow = [90.0, 91.0, 89.0], [50.0, 51.0, 49.0]
    _write(tmp_path, "lm_comparison", lm_rows([1.9, 1.91, 1.89], fast, slow))
    assert "**does not agree**" in report._lm_verdict(tmp_path).text
    _write(tmp_path, "lm_comparison", lm_rows([1.7, 1.71, 1.69], fast, slow))
    assert "**agrees**" in report._lm_verdict(tmp_path).text
    _write(tmp_path, "lm_comparison", lm_rows([1.78, 1.84, 1.76], fast, slow))  # overlaps deep
    assert "**within noise**" in report._lm_verdict(tmp_path).text


def test_a_claim_the_results_cannot_judge_reads_as_its_reason_alone(tmp_path):
    """One memory size cannot show quality growing with the memory: no verdict, and the text says
    why instead of naming a verdict of None."""
    _write(tmp_path, "lm_comparison", lm_rows([1.7, 1.71, 1.69], [90.0] * 3, [50.0] * 3))
    verdict = report._sweep_verdict(tmp_path)
    assert verdict.status is None and verdict.text and "None" not in verdict.text


def test_verdicts_list_every_claim_and_goal(tmp_path):
    _write(tmp_path, "lm_comparison", lm_rows([1.7, 1.71, 1.69], [90.0] * 3, [50.0, 51.0, 49.0]))
    _write(tmp_path, "bench_retrieval", retrieval_rows(GROWING_FLAT), {"device_type": "cpu"})
    judged = report.verdicts(tmp_path)
    assert judged[report.FIGURES["lm_learning_curves"].claim] == "agrees"
    assert judged[report.FIGURES["lm_memory_sweep"].claim] is None  # one memory size: no verdict
    assert judged[report.FIGURES["bench_retrieval"].claim] == "agrees"
    assert judged["goal: flat / product at 2^20 slots >= 150"] == "met"  # 427x, 426x, 427x


def test_goals_block_judges_cpu_and_gpu_results(tmp_path):
    """One line per goal, from the cpu results and the gpu results beside them, each judged on
    the interval of its rounds."""
    rounds = [  # 2^20 / 2^12 = 2.5 in each round, 2^20 / bound = 5
        [bench._row("product forward", 2**12, bench.Timing(1.0 + i / 100, 0.0, 2)),
         bench._row("product forward", 2**20, bench.Timing(2.5 + i / 40, 0.0, 2)),
         bench._row("lower bound", 2**20, bench.Timing(0.5 + i / 200, 0.0, 0))]
        for i in range(3)
    ]  # fmt: skip
    rows = bench.combine_rounds(rounds)
    for folder, device_type in ((tmp_path, "cpu"), (tmp_path / "gpu", "cuda")):
        meta = {"device": f"{device_type} device", "device_type": device_type,
                "profile": "p", "date": "today"}  # fmt: skip
        _write(folder, "bench_layer", rows, meta)
    lines = report._goals_block(tmp_path).splitlines()[2:]
    assert len(lines) == 4  # cpu: the bound; gpu: the ratio and the Triton layer's two bounds
    assert lines[0].startswith("- cpu device")
    assert "lower bound <= 4: 5 (95 % interval" in lines[0] and "-> not met" in lines[0]
    assert "2^20 / 2^12 time <= 2: 2.5" in lines[1] and "-> not met" in lines[1]
    assert "gpu/bench_layer.md" in lines[1]
    assert all("(triton)" in line and "not measured" in line for line in lines[2:])


def test_headline_block_shows_cpu_and_gpu_comparisons(tmp_path, monkeypatch):
    """Each profile's table with its own device, source link and verdict."""
    monkeypatch.setattr(report, "ROOT", tmp_path)
    speeds = {"cpu": [50.0, 51.0, 49.0], "gpu": [200.0, 201.0, 199.0]}  # deep: slower on cpu
    for folder, device in ((tmp_path / "figures", "cpu"), (tmp_path / "figures" / "gpu", "gpu")):
        meta = {"device": f"{device} device", "profile": device, "date": "today"}
        _write(folder, "lm_comparison", lm_rows([1.7, 1.71, 1.69], [90.0] * 3, speeds[device]),
               meta)  # fmt: skip
        (folder / "lm_comparison.md").write_text(f"# title\n\n| model |\n|---|\n| {device} |\n")
    block = report._headline_block(tmp_path / "figures")
    cpu, gpu = block.split("**Shallow + memory vs deep**")[1:]
    assert "cpu device" in cpu and "[figures/lm_comparison.md](figures/lm_comparison.md)" in cpu
    assert "| cpu |" in cpu and "**agrees**" in cpu
    assert "gpu device" in gpu and "(figures/gpu/lm_comparison.md)" in gpu
    assert "| gpu |" in gpu and "**does not agree**" in gpu


def test_costs_block_states_time_and_peak_memory_per_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ROOT", tmp_path)
    steps = [
        {"step": "lm-comparison", "seconds": 600.0, "peak_ram_gib": 1.5, "peak_gpu_gib": None},
        {"step": "bench-layer", "seconds": 90.0, "peak_ram_gib": 6.8, "peak_gpu_gib": None},
    ]
    meta = {"device": "CPU x86_64, 2 threads", "machine": "Example CPU, 2 cores, 16 GiB",
            "profile": "cpu"}  # fmt: skip
    _write(tmp_path / "figures", "reproduce_steps", steps, meta)
    old = [{"step": "bench-layer", "seconds": 20.0}]  # written before memory was recorded
    _write(tmp_path / "figures" / "gpu", "reproduce_steps", old, {**meta, "profile": "gpu"})
    cpu, gpu = report._costs_block(tmp_path / "figures").splitlines()[2:]
    assert "[cpu](figures/reproduce_steps.md)" in cpu and "Example CPU, 2 cores" in cpu
    assert "| 2 | 11.5 min | 6.8 GiB (bench-layer) | not measured |" in cpu
    assert "| 1 | 20 s | not measured | not measured |" in gpu


def test_notebook_table_lists_every_notebook_with_its_badge(tmp_path):
    table = report._notebook_table(tmp_path)
    notebooks = sorted((report.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in notebooks:
        assert report.NOTEBOOK_SUMMARIES[path.stem] in table
        assert f"(notebooks/{path.name})" in table
        assert f"blob/main/notebooks/{path.name})" in table
    assert table.count("not measured") == 2 * len(notebooks)
