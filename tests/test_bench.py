"""The bench command runs, records what it measured and where, and scales its curves right.

No timed assertions: benchmarks measure, they do not pass or fail on speed.
"""

import dataclasses
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


def test_layer_bench_measures_every_case():
    limits = {"memory_bandwidth_GBps": 10.0, "matmul_GFLOPps": 100.0}
    rows = bench.bench_layer(tiny_settings(), limits)
    cases = {row["case"] for row in rows}
    assert cases == {"FFN forward", "FFN train step", "product forward", "product train step",
                     "lower bound", "value step, Adam", "value step, SparseAdam"}  # fmt: skip
    assert bench.lookup(rows, "lower bound", 2**8).mean > 0


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
