"""`pkm-ref capacity`: matched models, training on facts, reused runs, claims on intervals, and
the whole study at smoke sizes."""

import dataclasses
import json
import re

import pytest
import torch

from pkm_ref import capacity, report, stats
from pkm_ref.cli import main
from pkm_ref.knowledge import KnowledgeBase, measure
from pkm_ref.model import LanguageModel

SMOKE = capacity.study_sizes("smoke")


@pytest.fixture(scope="module")
def base():
    return KnowledgeBase.generate(24, seed=0)


def test_dense_models_are_matched_to_the_memory_models_active_and_total_counts(base):
    memory, active, total = capacity.variants(SMOKE, base)
    assert (memory.role, active.role, total.role) == ("memory", "equal active", "equal total")
    counts = {v.role: capacity.parameter_counts(v.config) for v in (memory, active, total)}
    assert counts["memory"]["active"] < counts["memory"]["total"]
    for role, target in (("equal active", "active"), ("equal total", "total")):
        config = {"equal active": active, "equal total": total}[role].config
        assert not config.memory_layers
        gap = abs(counts[role]["total"] - counts["memory"][target])
        for width in (config.d_model - config.n_head, config.d_model + config.n_head):
            other = dataclasses.replace(config, d_model=width)  # the neighbouring widths
            assert abs(capacity.parameter_counts(other)["total"] - counts["memory"][target]) >= gap
    built = LanguageModel(memory.config).parameter_counts()
    assert capacity.parameter_counts(memory.config) == built
    assert capacity.value_parameters(memory.config) == SMOKE.memory.n_slots * SMOKE.d_model


def test_training_on_facts_sees_each_fact_exposures_times_and_learns_them(monkeypatch):
    small = KnowledgeBase.generate(12, seed=1)
    seen = torch.zeros(small.n_individuals, dtype=torch.long)  # batches that stated each person
    stating = KnowledgeBase.training_batch

    def counting(self, individuals, generator=None):
        seen.index_add_(0, individuals, torch.ones_like(individuals))
        return stating(self, individuals, generator)

    monkeypatch.setattr(KnowledgeBase, "training_batch", counting)
    sizes = dataclasses.replace(SMOKE, exposures=150, batch_size=5)
    config = capacity.schedule(sizes, small.n_individuals, seed=0, device="cpu")
    assert config.max_steps == 150 * 3  # ceil(12 / 5) steps per epoch
    memory = capacity.variants(sizes, small)[0]
    torch.manual_seed(0)
    model = LanguageModel(memory.config)
    before = measure(model, small)
    epochs = []
    capacity.train_on_facts(model, small, config, every=50, callback=lambda e, m: epochs.append(e))
    after = measure(model, small)
    assert epochs == [50, 100, 150] and model.training
    assert seen.tolist() == [150] * small.n_individuals  # every person once an epoch, no more
    assert before.recall < 0.2 and before.bits < 0.1 * small.information_bits()
    assert after.recall > 0.9 and after.bits > 0.5 * small.information_bits()


def test_slot_overlap_tells_filing_by_person_from_filing_by_fact():
    by_person = torch.tensor([[[[0, 1]], [[0, 1]]], [[[2, 3]], [[2, 3]]]])  # (B=2, K=2, H=1, 2)
    assert capacity.slot_overlap(by_person) == {"same_individual": 1.0, "other_individuals": 0.0}
    by_fact = torch.tensor([[[[0, 1]], [[2, 3]]], [[[0, 1]], [[2, 3]]]])
    assert capacity.slot_overlap(by_fact) == {"same_individual": 0.0, "other_individuals": 1.0}


def test_a_finished_run_is_reused_and_a_changed_one_retrained(tmp_path, base, monkeypatch):
    memory = capacity.variants(SMOKE, base)[0]
    config = capacity.schedule(SMOKE, base.n_individuals, seed=0, device="cpu")
    first = capacity.train_or_reuse(memory, base, config, tmp_path)
    assert 0 <= first["bits"] <= base.information_bits() and "memory" in first
    reads = first["memory"]["sample_indices"]  # (S, K, H, knn)
    assert len(reads) == capacity.SAMPLE_INDIVIDUALS and len(reads[0]) == base.n_attributes

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(capacity, "train_on_facts", no_training)
    assert capacity.train_or_reuse(memory, base, config, tmp_path) == first
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another run
        capacity.train_or_reuse(memory, base, dataclasses.replace(config, seed=1), tmp_path)


def _rows(memory_bits, active_bits, total_bits=(1.0, 1.0, 1.0), n=1000, params=100):
    """Rows of the largest base as the study writes them (information: 17.17 bits each)."""
    rows = []
    for role, bits in (("memory", memory_bits), ("equal active", active_bits),
                       ("equal total", total_bits)):  # fmt: skip
        estimate = stats.Estimate.of(bits)
        rows.append({
            "model": role, "role": role, "individuals": n, "information_bits": 17.17 * n,
            "seeds": estimate.n, "bits": estimate.to_json(),
            "recall": stats.Estimate.of([0.5] * estimate.n).to_json(),
            "bits_per_param": stats.Estimate.of(b / params for b in bits).to_json(),
            "params_total": params, "params_active": params, "value_params": 10,
            "step_ms": stats.Estimate.of([2.0, 2.1, 1.9]).to_json(),
        })  # fmt: skip
    return rows


@pytest.mark.parametrize(
    ("memory_bits", "active_bits", "status"),
    [
        ((600, 610, 590), (100, 101, 99), "agrees"),  # 6x, intervals clear of 5x
        ((300, 310, 290), (100, 101, 99), "does not agree"),  # 3x
        ((600, 300, 450), (100, 101, 99), "within noise"),  # the interval straddles 5x
    ],
)
def test_the_headline_compares_the_memory_with_five_times_the_dense_model(
    memory_bits, active_bits, status
):
    claim, text = capacity.headline_claim(_rows(memory_bits, active_bits))
    assert claim == status
    assert "extra bits per value-table parameter" in text and "A training step takes" in text


def test_the_headline_is_not_judged_on_a_base_too_small_to_show_five_times():
    """171.7 bits in the base, 100 in the dense model: even a memory that stores the whole base
    is 1.7x ahead, so "does not agree" would measure the base, not the memory."""
    claim, text = capacity.headline_claim(_rows((170, 171, 169), (100, 101, 99), n=10))
    assert claim is None and "only 1.7x the bits" in text and "too few to show 5x" in text
    claim, _ = capacity.headline_claim(_rows((1, 1, 1), (0, 0, 0), n=10))  # nothing stored
    assert claim == "agrees"  # the memory's interval is above 5 x 0


def test_the_headline_takes_each_model_on_the_base_where_it_stored_the_most():
    """A dense model past its capacity scores fewer bits on a larger base: judged there alone it
    would look 6x behind the memory; on its best (smaller) base it is 5x behind, within noise."""
    small = _rows((100, 101, 99), (120, 140, 100), n=1000)  # the dense model's best base
    large = _rows((600, 610, 590), (100, 101, 99), n=4000)
    claim, text = capacity.headline_claim(large)
    assert claim == "agrees"
    claim, text = capacity.headline_claim(small + large)
    assert claim == "within noise"
    assert "5.0x the 120 ± " in text and "1,000 individuals" in text and "4,000 individuals" in text


def test_the_published_capacity_is_judged_only_where_a_base_can_show_it():
    rows = _rows((1, 1, 1), (20, 21, 19), (20, 21, 19), n=10, params=100)  # 171.7 bits > 100
    status, text = capacity.published_claim(rows, exposures=100)
    assert status == "does not agree" and "below the published 1" in text
    status, text = capacity.published_claim(_rows((1, 1, 1), (99, 101, 100), (99, 101, 100),
                                                  n=10, params=100), exposures=100)  # fmt: skip
    assert status == "within noise" and "consistent with" in text
    status, text = capacity.published_claim(rows, exposures=1000)  # 2 bits: 200 > 171.7 bits
    assert status is None and "too few to reach 2" in text
    status, text = capacity.published_claim(rows, exposures=300)
    assert status is None and "no published figure" in text


def test_the_smoke_study_writes_its_table_figures_and_verdicts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path / "results"))
    runs = str(tmp_path / "runs")
    assert main(["capacity", "--profile", "smoke", "--runs", runs, "--quiet"]) == 0
    results = tmp_path / "results"
    for name in ("capacity.json", "capacity.md", "capacity_bits.png", "capacity_growth.png",
                 "capacity_usage.png"):  # fmt: skip
        assert (results / name).exists(), name
    data = json.loads((results / "capacity.json").read_text())
    assert data["meta"]["exposures"] == SMOKE.exposures
    rows = data["rows"]
    assert len(rows) == 3 * len(SMOKE.individuals)
    assert {row["seeds"] for row in rows} == {SMOKE.seeds}
    assert all(0 <= stats.read(r["bits"]).mean <= r["information_bits"] for r in rows)
    printed = capsys.readouterr().out
    assert "stored the most bits" in printed and "Claim" in (results / "capacity.md").read_text()
    runs = list((tmp_path / "runs" / "smoke" / "capacity").rglob("result.json"))
    assert len(runs) == 3 * len(SMOKE.individuals) * SMOKE.seeds


def test_bad_arguments_fail_at_once_with_their_value(tmp_path, capsys):
    cases = ((["--seeds", "0"], "--seeds must be >= 1, got 0"),
             (["--exposures", "0"], "exposures must be >= 1, got 0"),
             (["--individuals", "5", "5"], "individuals must be distinct and >= 2, got [5, 5]"),
             (["--individuals", "1", "5"], "got [1, 5]"))  # fmt: skip
    for argv, message in cases:
        assert main(["capacity", "--profile", "smoke", "--runs", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_sizes_refuse_a_bad_knob_whoever_builds_them():
    """The API checks what the CLI checks: a study built in Python fails at once too."""
    for change, message in (({"individuals": (40, 40)}, "individuals must be distinct"),
                            ({"individuals": ()}, "individuals must be distinct"),
                            ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                            ({"timing_steps": 0}, "timing_steps must be >= 1, got 0"),
                            ({"value_lr": 0.0}, "value_lr must be > 0, got 0.0")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            dataclasses.replace(SMOKE, **change)
    assert dataclasses.replace(SMOKE, individuals=(160, 40)).individuals == (40, 160)


def test_the_report_judges_both_claims_and_the_readme_shows_the_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ROOT", tmp_path)
    folder = tmp_path / "figures"
    folder.mkdir()
    rows = _rows((600, 610, 590), (100, 101, 99), (20, 21, 19), n=100, params=100)
    meta = {"profile": "cpu", "device": "a CPU", "date": "today", "exposures": 100}
    (folder / "capacity.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (folder / "capacity_bits.png").write_bytes(b"png")
    judged = report.verdicts(folder)
    assert judged[report.FIGURES["capacity_bits"].claim] == "agrees"
    assert judged[report.FIGURES["capacity_growth"].claim] == "does not agree"  # 0.2 bits/param
    rows[1]["bits"] = stats.Estimate.of([1000, 1001, 999]).to_json()  # 1,717 bits: under 5x this
    (folder / "capacity.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    assert report.verdicts(folder)[report.FIGURES["capacity_bits"].claim] is None
    rows[1]["bits"] = stats.Estimate.of([100, 101, 99]).to_json()
    (folder / "capacity.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    text = report.write_results("cpu", folder).read_text()
    assert "### capacity_bits" in text and "**agrees** at this scale" in text
    block = report._capacity_block(folder)
    assert block.startswith("![Bits stored against parameters") and "(figures/capacity.md)" in block
    assert "100 exposures per fact" in block and "**does not agree**" in block
