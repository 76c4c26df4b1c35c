"""Your run against the reference: every shared number beside its reference, and the verdicts."""

import json

import pytest

from pkm_ref import reference, stats


def write(folder, name, rows, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta or {"device": f"{folder.name} device"}, "rows": rows}
    (folder / f"{name}.json").write_text(json.dumps(data))


def lm_rows(memory_bpb: list[float]) -> list[dict]:
    def estimate(values):
        return stats.Estimate.of(values).to_json()

    return [
        {"model": model, "role": role, "memory_slots": slots, "test_bpb": estimate(bpb),
         "infer_tok_s": estimate(speed), "train_tok_s": estimate([9.0, 9.5, 8.5])}
        for model, role, slots, bpb, speed in [
            ("dense-2L", "shallow", 0, [2.0, 2.01, 1.99], [200.0, 201.0, 199.0]),
            ("dense-4L", "deep", 0, [1.8, 1.81, 1.79], [100.0, 101.0, 99.0]),
            ("pkm-2L-n64", "memory", 4096, memory_bpb, [150.0, 151.0, 149.0]),
        ]
    ]  # fmt: skip


def test_every_shared_number_is_set_beside_its_reference(tmp_path):
    yours, theirs = tmp_path / "yours", tmp_path / "theirs"
    write(yours, "lm_comparison", lm_rows([1.9, 1.91, 1.89]))
    write(theirs, "lm_comparison", [*lm_rows([2.0, 2.01, 1.99]), {"model": "only-theirs"}])
    found = {(d.row, d.column): d for d in reference.differences(yours, theirs)}
    assert set(found) == {(m, c) for m in ("dense-2L", "dense-4L", "pkm-2L-n64")
                          for c in ("test_bpb", "train_tok_s", "infer_tok_s")}  # fmt: skip
    memory = found[("pkm-2L-n64", "test_bpb")]
    assert memory.difference == pytest.approx(-0.1) and memory.relative == pytest.approx(-0.05)
    assert memory.order == "lower" and found[("dense-2L", "test_bpb")].order == "within noise"


def test_a_number_measured_once_per_model_is_compared_once(tmp_path):
    """Capacity's step time is measured once per model and copied into the row of each base: one
    difference per model, named by the model alone; bits are compared per model and base."""
    yours, theirs = tmp_path / "yours", tmp_path / "theirs"
    for folder, step_ms in ((yours, [10.0, 11.0, 12.0]), (theirs, [20.0, 21.0, 22.0])):
        rows = [
            {"model": model, "individuals": n, "bits": stats.Estimate.of([n, n + 1.0]).to_json(),
             "step_ms": stats.Estimate.of(step_ms).to_json()}
            for model in ("memory", "dense") for n in (160, 640, 2560)
        ]  # fmt: skip
        write(folder, "capacity", rows)
    found = [(d.row, d.column) for d in reference.differences(yours, theirs)]
    assert sorted(found) == sorted(
        [(f"{m}, {n}", "bits") for m in ("memory", "dense") for n in (160, 640, 2560)]
        + [("memory", "step_ms"), ("dense", "step_ms")]
    )


def test_a_reference_of_one_run_is_compared_as_an_exact_number():
    one, mine = stats.Estimate.of([232.0]), stats.Estimate.of([3000.0, 3600.0, 4200.0])
    assert reference.Difference("t", "r", "c", mine, one).order == "higher"
    assert reference.Difference("t", "r", "c", one, one).order == "no interval"


def test_the_report_names_each_verdict_and_number_and_the_summary_the_differences(tmp_path):
    yours, theirs = tmp_path / "yours", tmp_path / "theirs"
    write(yours, "lm_comparison", lm_rows([1.9, 1.91, 1.89]))  # worse than deep: does not agree
    write(theirs, "lm_comparison", lm_rows([1.7, 1.71, 1.69]))  # better than deep: agrees
    path, summary = reference.write_comparison(yours, theirs)
    text = path.read_text()
    assert path == yours / "vs_reference.md" and "theirs device" in text
    assert "| does not agree | agrees | differs |" in text
    row = "| pkm-2L-n64 | test_bpb | 1.900 ± 0.025 | 1.700 ± 0.025 | +0.2 | +11.8% | higher |"
    assert row in text
    assert "| no verdict | no verdict | - |" in text  # one memory size: no sweep verdict
    assert "verdicts: 0 of the 1 that both runs judged match the reference" in summary
    assert "differs: The paper's claim (a shallow model" in summary
    assert "9 compared, 8 within noise of the reference" in summary


def test_without_a_reference_the_report_says_so(tmp_path):
    write(tmp_path / "yours", "lm_comparison", lm_rows([1.9, 1.91, 1.89]))
    path, summary = reference.write_comparison(tmp_path / "yours", None)
    assert "No committed reference" in path.read_text() and "no reference" in summary
    (tmp_path / "empty").mkdir()
    _, summary = reference.write_comparison(tmp_path / "yours", tmp_path / "empty")
    assert f"no results in {tmp_path / 'empty'}" in summary
