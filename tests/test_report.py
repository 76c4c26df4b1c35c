"""RESULTS.md names every figure; no figure in figures/ is orphaned; verdicts read the results."""

import json

from pkm_ref import report


def test_every_committed_figure_is_registered():
    committed = {p.stem for p in (report.ROOT / "figures").rglob("*.png")}
    assert committed - set(report.FIGURES) == set(), "register these in pkm_ref/report.py"


def test_every_registered_figure_has_a_known_section():
    assert {f.section for f in report.FIGURES.values()} <= set(report.SECTIONS)
    assert set(report.TABLES.values()) <= set(report.SECTIONS)


def _write(folder, name, rows):
    (folder / f"{name}.json").write_text(json.dumps({"meta": {}, "rows": rows}))


def test_results_name_every_figure_and_judge_the_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path))
    rows = [
        {"case": case, "slots": slots, "median_ms": ms}
        for case, slots, ms in [
            ("flat keys", 4096, 10.0), ("product keys", 4096, 5.0),
            ("flat keys", 2**20, 2560.0), ("product keys", 2**20, 6.0),
        ]
    ]  # fmt: skip
    _write(tmp_path, "bench_retrieval", rows)
    (tmp_path / "bench_retrieval.png").write_bytes(b"png")
    (tmp_path / "stray_plot.png").write_bytes(b"png")
    text = report.write_results("smoke").read_text()
    assert "256x slower" in text and "**agrees**" in text
    assert "## Unregistered figures" in text and "stray_plot.png" in text
    for name in report.FIGURES:
        assert f"### {name}" in text


def test_retrieval_verdict_skips_sizes_where_flat_keys_were_not_timed(tmp_path):
    """Above the flat-key limit the bench writes a flat row with no time; the verdict spans the
    sizes where both searches ran, and says so when there are fewer than two."""
    rows = [
        {"case": case, "slots": slots, "median_ms": ms}
        for case, slots, ms in [
            ("flat keys", 4096, 10.0), ("product keys", 4096, 5.0),
            ("flat keys", 2**16, 160.0), ("product keys", 2**16, 5.5),
            ("flat keys", 2**20, None), ("product keys", 2**20, 6.0),
        ]
    ]  # fmt: skip
    _write(tmp_path, "bench_retrieval", rows)
    verdict = report._retrieval_verdict(tmp_path)
    assert "From 4,096 to 65,536 slots (16x)" in verdict and "16x slower" in verdict
    _write(tmp_path, "bench_retrieval", [r for r in rows if r["slots"] != 2**16][1:])
    assert "fewer than two sizes" in report._retrieval_verdict(tmp_path)


def test_lm_verdict_says_when_the_claim_fails(tmp_path):
    rows = [
        dict(model=model, role=role, test_bpb=bpb, infer_tok_s=infer, train_tok_s=train)
        for model, role, bpb, infer, train in [
            ("dense-2L", "shallow", 2.0, 100, 10),
            ("dense-4L", "deep", 1.8, 50, 5),
            ("pkm-2L-n64", "memory", 1.9, 90, 8),
        ]
    ]
    _write(tmp_path, "lm_comparison", rows)
    assert "**does not agree**" in report._lm_verdict(tmp_path)
    rows[2]["test_bpb"] = 1.7
    _write(tmp_path, "lm_comparison", rows)
    assert "**agrees**" in report._lm_verdict(tmp_path)


def test_notebook_table_lists_every_notebook_with_its_badge(tmp_path):
    table = report._notebook_table(tmp_path)
    notebooks = sorted((report.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in notebooks:
        assert report.NOTEBOOK_SUMMARIES[path.stem] in table
        assert f"(notebooks/{path.name})" in table
        assert f"blob/main/notebooks/{path.name})" in table
    assert table.count("not measured") == 2 * len(notebooks)


def test_goals_block_judges_cpu_and_gpu_results(tmp_path):
    """One line per goal, from the cpu results and the gpu results beside them."""
    from pkm_ref import bench

    rows = [  # 2^20 / 2^12 = 2.5, 2^20 / bound = 5
        bench._row("product forward", 2**12, bench.Timing(1.0, 0.0, 1)),
        bench._row("product forward", 2**20, bench.Timing(2.5, 0.0, 1)),
        bench._row("lower bound", 2**20, bench.Timing(0.5, 0.0, 0)),
    ]
    for folder, device_type in ((tmp_path, "cpu"), (tmp_path / "gpu", "cuda")):
        folder.mkdir(exist_ok=True)
        meta = {"device": f"{device_type} device", "device_type": device_type,
                "profile": "p", "date": "today"}  # fmt: skip
        (folder / "bench_layer.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    lines = report._goals_block(tmp_path).splitlines()[2:]
    assert len(lines) == 3  # cpu: ratio and bound; gpu: ratio
    assert "2^20 / 2^12 time <= 3: 2.5 -> met" in lines[0] and lines[0].startswith("- cpu device")
    assert "lower bound <= 4: 5 -> NOT met" in lines[1]
    assert "2^20 / 2^12 time <= 2: 2.5 -> NOT met" in lines[2] and "gpu/bench_layer.md" in lines[2]


def test_headline_block_shows_cpu_and_gpu_comparisons(tmp_path, monkeypatch):
    """Each profile's table with its own device, source link and verdict."""
    monkeypatch.setattr(report, "ROOT", tmp_path)
    speeds = {"cpu": (100, 50), "gpu": (100, 200)}  # memory, deep tokens/s: faster on cpu only
    for folder, device in ((tmp_path / "figures", "cpu"), (tmp_path / "figures" / "gpu", "gpu")):
        folder.mkdir(parents=True, exist_ok=True)
        memory_speed, deep_speed = speeds[device]
        rows = [
            {"model": "s", "role": "shallow", "test_bpb": 2.0, "infer_tok_s": 300,
             "train_tok_s": 3},
            {"model": "d", "role": "deep", "test_bpb": 1.9, "infer_tok_s": deep_speed,
             "train_tok_s": 1},
            {"model": "m", "role": "memory", "test_bpb": 1.8, "infer_tok_s": memory_speed,
             "train_tok_s": 2},
        ]  # fmt: skip
        meta = {"device": f"{device} device", "profile": device, "date": "today"}
        (folder / "lm_comparison.json").write_text(json.dumps({"meta": meta, "rows": rows}))
        (folder / "lm_comparison.md").write_text(f"# title\n\n| model |\n|---|\n| {device} |\n")
    block = report._headline_block(tmp_path / "figures")
    cpu, gpu = block.split("**Shallow + memory vs deep**")[1:]
    assert "cpu device" in cpu and "[figures/lm_comparison.md](figures/lm_comparison.md)" in cpu
    assert "| cpu |" in cpu and "**agrees**" in cpu
    assert "gpu device" in gpu and "(figures/gpu/lm_comparison.md)" in gpu
    assert "| gpu |" in gpu and "**does not agree**" in gpu
