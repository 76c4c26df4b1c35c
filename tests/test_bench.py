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

from pkm_ref import bench, cli, figures


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
    assert all(row["median_ms"] > 0 and row["iqr_ms"] >= 0 for row in results["rows"])
    assert (folder / "bench_retrieval.md").read_text().startswith("# Retrieval")
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


def test_goals_read_the_rows():
    rows = [
        bench._row("flat keys", 2**20, bench.Timing(30.0, 0.0, 1)),
        bench._row("product keys", 2**20, bench.Timing(0.1, 0.0, 1)),
    ]
    cpu, gpu = {"device_type": "cpu"}, {"device_type": "cuda", "memory_bandwidth_GBps": 1.0}
    [flat_goal] = bench.retrieval_goals(rows, cpu)
    assert flat_goal.value == pytest.approx(300) and flat_goal.met
    assert "-> met" in flat_goal.line()
    read_goal = bench.retrieval_goals(rows, gpu)[1]
    assert read_goal.met is None and "not measured" in read_goal.line()
    assert all(goal.met is None for goal in bench.layer_goals([], cpu))


@pytest.mark.parametrize("sizes", [["7"], ["4"], ["8", "31"]])
def test_sizes_must_be_even_exponents(sizes, capsys):
    assert cli.main(["bench", "retrieval", "--profile", "smoke", "--sizes", *sizes]) == 2
    assert "pkm-ref bench: error: --sizes must be even exponents" in capsys.readouterr().err


def tiny_settings() -> bench.Settings:
    settings = bench.default_settings("smoke", torch.device("cpu"))
    return dataclasses.replace(settings, sizes=(8,), queries=64, repeat=1, model_batch=(1, 16))


def test_layer_bench_measures_every_case():
    limits = {"memory_bandwidth_GBps": 10.0, "matmul_GFLOPps": 100.0}
    rows = bench.bench_layer(tiny_settings(), limits)
    cases = {row["case"] for row in rows}
    assert cases == {"FFN forward", "FFN train step", "product forward", "product train step",
                     "lower bound", "value step, Adam", "value step, SparseAdam"}  # fmt: skip
    assert bench.lookup(rows, "lower bound", 2**8) > 0


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
