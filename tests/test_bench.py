"""The bench command runs, records what it measured and where, and scales its curves right.

No timed assertions: benchmarks measure, they do not pass or fail on speed.
"""

import dataclasses
import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from pkm_ref import ProductKeyMemory, bench, cli, figures


def test_bench_retrieval_smoke_writes_results_with_metadata():
    assert cli.main(["bench", "retrieval", "--profile", "smoke"]) == 0
    folder = figures.output_dir("smoke")
    assert folder.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    results = json.loads((folder / "bench_retrieval.json").read_text())
    meta = results["meta"]
    for field in ("device", "dtype", "torch", "threads", "date", "queries"):
        assert meta[field], field
    assert meta["profile"] == "smoke" and meta["dtype"] == "float32"
    assert meta["threads"] == torch.get_num_threads()
    assert meta["memory_bandwidth_GBps"] > 0 and meta["matmul_GFLOPps"] > 0
    cases = {(row["case"], row["slots"]) for row in results["rows"]}
    assert cases == {(case, 2**e) for case in bench.RETRIEVAL_CASES for e in (8, 10)}
    rounds = meta["rounds"]
    assert rounds == 2 and all(row["rounds"] == rounds for row in results["rows"])
    for row in results["rows"]:  # every time: one value per round, and their 95 % interval
        time = row["median_ms"]
        assert time["n"] == rounds and all(value > 0 for value in time["values"])
        assert time["low"] <= time["mean"] <= time["high"]
    table = (folder / "bench_retrieval.md").read_text()
    assert table.startswith("# Retrieval") and " ± " in table and "95 % Student-t" in table
    assert (folder / "bench_retrieval.png").stat().st_size > 0


def test_retrieval_rows_say_how_many_queries_were_timed():
    """The flat search is timed on a few queries and scaled: its rows say so."""
    settings = bench.default_settings("smoke", torch.device("cpu"))
    settings = dataclasses.replace(settings, queries=64, flat_queries=16, repeat=1)
    rows = bench._retrieval_at(8, settings)
    timed = {row["case"]: row["timed_queries"] for row in rows}
    assert timed == {case: 16 if case == "flat keys" else 64 for case in bench.RETRIEVAL_CASES}
    without_flat = dataclasses.replace(settings, flat_max_exponent=6)  # flat keys not measured
    flat_row = bench._retrieval_at(8, without_flat)[0]
    assert flat_row["case"] == "flat keys"
    assert flat_row["median_ms"] is None and flat_row["timed_queries"] is None


def test_bandwidth_and_matmul_probes_are_positive_and_finite():
    bandwidth = bench.memory_bandwidth(torch.device("cpu"), n_bytes=1 << 22, repeat=2)
    flops = bench.matmul_throughput(torch.device("cpu"), size=64, repeat=2)
    for value in (bandwidth, flops):
        assert math.isfinite(value) and value > 0


def test_cost_model_curve_is_scaled_through_the_measured_points():
    curve = bench.scale_to_measured([1.0, 2.0, 4.0], [10.0, 20.0, 40.0])
    assert curve == pytest.approx([10.0, 20.0, 40.0])
    # Geometric mean of the ratios (2 and 8 -> 4); unmeasured points are skipped.
    assert bench.scale_to_measured([1.0, 1.0, 1.0], [2.0, None, 8.0]) == pytest.approx([4.0] * 3)
    with pytest.raises(ValueError, match="no measured point"):
        bench.scale_to_measured([1.0], [None])


def test_analytic_work_is_linear_for_flat_and_sublinear_for_product_keys():
    slots = [2**12, 2**16, 2**20]
    flat = bench.analytic_work("flat", slots)
    product = bench.analytic_work("product", slots)
    assert flat[2] / flat[1] == pytest.approx(16, rel=0.05)  # O(N)
    assert 1 < product[2] / product[1] < 4.1  # O(sqrt(N) + k^2): at most x4 for x16 slots
    assert flat[2] / product[2] > 100


def test_timing_median_and_iqr():
    timing = bench.Timing.from_runs([2.0, 1.0, 3.0, 4.0, 100.0])
    assert timing.median_s == 3.0 and timing.iqr_s == 2.0 and timing.runs == 5
    assert timing.best_s == 1.0
    assert bench.Timing.from_runs([0.5]) == bench.Timing(0.5, 0.0, 1, 0.5)


def test_measure_warms_up_then_repeats():
    calls = []
    timing = bench.measure(lambda: calls.append(1), repeat=3, device=torch.device("cpu"))
    assert len(calls) == 4 and timing.runs == 3


def rounds_of(times: dict[str, list[float]], slots: int = 2**20) -> list[dict]:
    """Rows of several rounds combined: ``times`` gives each case's seconds, one per round."""
    count = len(next(iter(times.values())))
    rounds = [
        [bench._row(case, slots, bench.Timing(ms[i], 0.0, 3)) for case, ms in times.items()]
        for i in range(count)
    ]
    return bench.combine_rounds(rounds)


def test_goals_are_met_only_when_the_whole_interval_clears_the_target():
    cpu = {"device_type": "cpu"}
    # flat / product in each round: 300, 310, 290 -> far above 150
    clear = rounds_of({"flat keys": [30.0, 31.0, 29.0], "product keys": [0.1, 0.1, 0.1]})
    [goal] = bench.retrieval_goals(clear, cpu)
    assert goal.value.values == pytest.approx((300, 310, 290)) and goal.status == "met"
    assert "95 % interval" in goal.line() and "3 rounds" in goal.line() and "-> met" in goal.line()
    # 100, 200, 160: the mean (153) is above 150 but the interval reaches below it
    noisy = rounds_of({"flat keys": [10.0, 20.0, 16.0], "product keys": [0.1, 0.1, 0.1]})
    assert bench.retrieval_goals(noisy, cpu)[0].status == "within noise"
    # 100, 101, 99: the whole interval is below 150
    below = rounds_of({"flat keys": [10.0, 10.1, 9.9], "product keys": [0.1, 0.1, 0.1]})
    [goal] = bench.retrieval_goals(below, cpu)
    assert goal.status == "not met" and "-> not met" in goal.line()


def test_goals_of_one_round_decide_nothing():
    """Results written before rounds existed (plain numbers) still read, as one round each."""
    rows = [{"case": "flat keys", "slots": 2**20, "median_ms": 30.0},
            {"case": "product keys", "slots": 2**20, "median_ms": 0.1}]  # fmt: skip
    cpu, gpu = {"device_type": "cpu"}, {"device_type": "cuda", "memory_bandwidth_GBps": 1.0}
    [goal] = bench.retrieval_goals(rows, cpu)
    assert goal.value.mean == pytest.approx(300) and goal.status == "within noise"
    assert "one round: no interval" in goal.line()
    read_goal = bench.retrieval_goals(rows, gpu)[1]
    assert read_goal.status is None and "not measured" in read_goal.line()
    assert all(goal.status is None for goal in bench.layer_goals([], cpu))


def test_rounds_combine_into_estimates_and_keep_their_labels():
    first = [bench._row("a", 4, bench.Timing(0.001, 0.0, 2), timed_queries=8, GBps=1.0),
             bench._row("b", 4, None, timed_queries=None, GBps=None)]  # fmt: skip
    second = [bench._row("a", 4, bench.Timing(0.003, 0.0, 2), timed_queries=8, GBps=3.0),
              bench._row("b", 4, None, timed_queries=None, GBps=None)]  # fmt: skip
    a, b = bench.combine_rounds([first, second])
    assert (a["case"], a["slots"], a["runs"], a["timed_queries"], a["rounds"]) == ("a", 4, 2, 8, 2)
    assert a["median_ms"]["values"] == pytest.approx([1.0, 3.0]) and a["GBps"]["mean"] == 2.0
    assert b["median_ms"] is None and b["GBps"] is None  # not measured: no estimate
    with pytest.raises(ValueError, match="different cases"):
        bench.combine_rounds([first, second[::-1]])


def test_a_layer_keeps_no_gradient_after_its_timed_train_steps():
    """The layer bench frees each layer's last gradients (0.5 GB at 2^20 slots on the cpu)."""
    settings = tiny_settings()
    layer = ProductKeyMemory(bench.D_MODEL, bench.D_MODEL, 16, bench.K_DIM, bench.HEADS,
                             bench.KNN, sparse=True)  # fmt: skip
    bench.train_step_timing(layer, torch.randn(8, bench.D_MODEL), settings)
    assert all(parameter.grad is None for parameter in layer.parameters())


@pytest.mark.parametrize("sizes", [["7"], ["4"], ["8", "31"]])
def test_sizes_must_be_even_exponents(sizes, capsys):
    assert cli.main(["bench", "retrieval", "--profile", "smoke", "--sizes", *sizes]) == 2
    assert "pkm-ref bench: error: --sizes must be even exponents" in capsys.readouterr().err


def tiny_settings() -> bench.Settings:
    settings = bench.default_settings("smoke", torch.device("cpu"))
    return dataclasses.replace(
        settings, sizes=(8,), queries=64, repeat=1, rounds=1, model_batch=(1, 16)
    )


LIMITS = {"memory_bandwidth_GBps": 10.0, "matmul_GFLOPps": 100.0}


def test_layer_bench_measures_every_case():
    """The torch layer at every size, and at the goals' size (here 2^8) under torch.compile."""
    rows = bench.bench_layer(tiny_settings(), LIMITS)
    cases = {row["case"] for row in rows}
    assert cases == {"FFN forward", "FFN train step", "product forward", "product train step",
                     "product forward (compiled)", "lower bound", "value step, Adam",
                     "value step, SparseAdam"}  # fmt: skip
    assert bench.lookup(rows, "lower bound", 2**8).mean > 0
    assert bench.goal_size((8, 10, 22)) == 2**10 and bench.goal_size((12, 20, 22)) == 2**20
    assert bench.goal_size((22, 24)) is None


# The device the Triton kernels run on in this process: CUDA, else the interpreter's CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("part", ["retrieval", "layer", "paper"])
def test_triton_rows_are_measured_where_the_kernels_run(part):
    """With ``Settings.triton`` every bench adds its Triton rows beside the torch ones: run here
    at toy sizes (on CPU in Triton's interpreter, which the bench itself never times)."""
    pytest.importorskip("triton", reason="triton is in the dev extra on Linux only")
    settings = dataclasses.replace(
        bench.default_settings("smoke", KERNEL_DEVICE),
        sizes=(6,), queries=4, flat_queries=4, repeat=1, rounds=1, paper_batch=(1, 8),
        triton=True, triton_note="",
    )  # fmt: skip
    measure = {"retrieval": lambda: bench._retrieval_at(6, settings),
               "layer": lambda: bench.bench_layer(settings, LIMITS),
               "paper": lambda: bench.bench_paper(settings, LIMITS)}[part]  # fmt: skip
    rows = measure()
    triton = {
        "retrieval": set(bench.TRITON_RETRIEVAL_CASES),
        "layer": {"product forward (triton)", "product forward (triton, bf16 values)",
                  "product forward (triton), 4x tokens", "product train step (triton)",
                  "lower bound, 4x tokens"},
        "paper": {"L + memory (triton)", "L + memory (triton, bf16 values)",
                  "memory layer (triton)", "memory layer (triton, bf16 values)"},
    }[part]  # fmt: skip
    cases = {row["case"] for row in rows}
    assert triton <= cases and cases - triton, "Triton rows beside the torch ones"
    assert all(row["median_ms"] > 0 for row in rows if row["case"] in triton)
    if part == "retrieval":
        speeds = {row["case"]: row["GBps"] for row in rows if row["case"] in triton}
        assert speeds["product keys (triton)"] is None and speeds["value read (triton)"] > 0


def test_kernel_rows_say_where_triton_is_measured(monkeypatch):
    """Triton rows where the kernels run compiled (CUDA); elsewhere none, and the reason."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.kernel_rows("auto", cpu) == (
        False, "Triton rows not measured: Triton kernels run on CUDA only (cpu here)"
    )  # fmt: skip
    assert bench.kernel_rows("torch", cuda) == (False, "not measured: --kernels torch")
    with pytest.raises(ValueError, match="--kernels triton: Triton kernels run on CUDA only"):
        bench.kernel_rows("triton", cpu)
    monkeypatch.setattr(bench._triton, "available", lambda: False)
    assert "triton does not import here" in bench.kernel_rows("auto", cuda)[1]
    if importlib.util.find_spec("triton") is None:
        return
    from pkm_ref import search_triton

    monkeypatch.setattr(bench._triton, "available", lambda: True)
    monkeypatch.setattr(search_triton, "INTERPRETED", False)
    assert bench.kernel_rows("auto", cuda) == bench.kernel_rows("triton", cuda) == (True, "")
    monkeypatch.setattr(search_triton, "INTERPRETED", True)
    assert "interpreted" in bench.kernel_rows("auto", cuda)[1]


def test_kernels_option_of_the_bench_command(capsys):
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main(["bench", "layer", "--profile", "smoke", "--kernels", "cuda"])
    if not torch.cuda.is_available():
        assert cli.main(["bench", "paper", "--profile", "smoke", "--kernels", "triton"]) == 2
        assert "--kernels triton: Triton kernels run on CUDA only" in capsys.readouterr().err


GPU = {"device_type": "cuda", "queries": 4096, "memory_bandwidth_GBps": 4000.0}


def test_layer_goals_on_a_gpu_judge_the_triton_layer_against_its_bound():
    rows = rounds_of({
        "product forward": [1.5, 1.6, 1.55], "lower bound": [0.25, 0.25, 0.25],
        "product forward (triton)": [0.40, 0.41, 0.42],  # 1.6 to 1.7 x the bound: met
        "lower bound, 4x tokens": [0.5, 0.5, 0.5],
        "product forward (triton), 4x tokens": [1.2, 1.25, 1.3],  # 2.4 to 2.6 x: not met
    })  # fmt: skip
    rows += rounds_of({"product forward": [1.0, 1.0, 1.0]}, slots=2**12)
    goals = {goal.text: goal for goal in bench.layer_goals(rows, GPU)}
    assert goals["product layer 2^20 / 2^12 time"].status == "met"
    assert goals["product layer (triton) 2^20 / lower bound"].status == "met"
    assert goals["product layer (triton) 2^20 / lower bound, 4x tokens"].status == "not met"
    cpu = {goal.text for goal in bench.layer_goals(rows, {"device_type": "cpu"})}
    assert cpu == {"product layer 2^20 / lower bound"}, "the 2^20 / 2^12 CPU goal is retired"


def test_retrieval_goals_on_a_gpu_ask_70_percent_of_the_bandwidth_of_the_triton_read():
    reads = {"value read": [1000.0] * 3, "value read (compiled)": [2400.0, 2500.0, 2450.0],
             "value read (triton)": [3000.0, 3100.0, 2900.0]}  # fmt: skip
    rows = bench.combine_rounds([
        [bench._row(case, 2**20, bench.Timing(1e-3, 0.0, 3), GBps=speeds[i])
         for case, speeds in reads.items()]
        for i in range(3)
    ])  # fmt: skip
    goals = {goal.text: goal for goal in bench.retrieval_goals(rows, GPU)}
    compiled = goals["value read (compiled) / memory bandwidth at 2^20"]
    assert compiled.target == 0.5 and compiled.status == "met"
    triton = goals["value read (triton) / memory bandwidth at 2^20"]
    assert triton.value.mean == pytest.approx(0.75) and triton.status == "within noise"


def paper_rows(layer: list[float], memory: list[float], train: list[float]) -> list[dict]:
    """Rows of the paper bench, three rounds: one dense block takes 1 ms and a 2L dense model's
    inference 10 ms and training step 30 ms; the Triton memory's layer, inference and training
    step take ``layer``, ``memory`` and ``train`` ms."""
    slots = 2**18
    times = {(bench.BLOCK, None): ([1.0] * 3, None), (bench.DEEP, None): ([10.0] * 3, [30.0] * 3),
             (bench.memory_layer_case("triton"), slots): (layer, None),
             (bench.memory_case("triton"), slots): (memory, train)}  # fmt: skip
    return bench.combine_rounds([
        [bench._row(case, size, bench.Timing(infer[i] / 1e3, 0.0, 3),
                    train_ms=None if steps is None else steps[i], layers=None)
         for (case, size), (infer, steps) in times.items()]
        for i in range(3)
    ])  # fmt: skip


def test_paper_goals_judge_the_triton_memory_against_the_deep_model():
    met = paper_rows(layer=[1.2, 1.3, 1.25], memory=[5.0, 5.1, 4.9], train=[18.0, 18.5, 18.2])
    goals = bench.paper_goals(met, {"device_type": "cuda"})
    assert [goal.text for goal in goals] == [
        "memory layer (triton) / dense block forward",
        "inference L + memory (triton) / dense (2L)",
        "training step L + memory (triton) / dense (2L)",
    ]
    assert [goal.target for goal in goals] == [1.5, 0.55, 0.65]
    assert [goal.status for goal in goals] == ["met", "met", "met"]
    missed = paper_rows(layer=[2.0, 2.1, 1.9], memory=[5.0, 6.0, 5.5], train=[25.0, 26.0, 25.5])
    statuses = [goal.status for goal in bench.paper_goals(missed, {"device_type": "cuda"})]
    assert statuses == ["not met", "within noise", "not met"]
    assert bench.paper_goals(met, {"device_type": "cpu"}) == []  # GPU goals
    without_triton = [row for row in met if "triton" not in row["case"]]
    goals = bench.paper_goals(without_triton, {"device_type": "cuda"})
    assert all(goal.status is None for goal in goals)


def test_bench_paper_smoke_writes_results_named_by_kernels():
    assert cli.main(["bench", "paper", "--profile", "smoke"]) == 0
    results = json.loads((figures.output_dir("smoke") / "bench_paper.json").read_text())
    cases = [row["case"] for row in results["rows"]]
    torch_cases = ["L + memory (torch)", "L + memory (torch, compiled read)"]
    assert cases[:4] == ["dense (L)", "dense (2L)", *torch_cases]
    assert {row["layers"] for row in results["rows"][:4]} == {2, 4}
    assert "memory layer (torch)" in cases and bench.BLOCK in cases
    assert all(row["train_ms"]["mean"] > 0 for row in results["rows"][:4])
    meta = results["meta"]
    assert meta["kernels"] == "torch" and "CUDA only" in meta["triton_note"]
    assert meta["setting"].startswith("d_model 32, 2 attention heads, L = 2 blocks")
    table = (figures.output_dir("smoke") / "bench_paper.md").read_text()
    assert "Triton rows not measured" in table


def test_model_bench_measures_flat_product_and_depth():
    rows = bench.bench_model(tiny_settings(), {})
    cases = [row["case"] for row in rows]
    assert cases == ["product keys", "flat keys", "dense, 4 layers", "dense, 8 layers",
                     "4 layers + product memory"]  # fmt: skip
    assert all(row["tokens_per_s"] > 0 for row in rows)


def test_measure_in_turns_alternates_the_functions():
    calls = []
    timings = bench.measure_in_turns(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeat=2, device=torch.device("cpu"), warmup=1,
    )  # fmt: skip
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then rounds of one call each
    assert set(timings) == {"a", "b"} and all(t.runs == 2 for t in timings.values())
