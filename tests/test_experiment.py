"""pkm-ref compare: seeds vary the models, not the split; claims are judged on intervals."""

import pytest
import torch

from pkm_ref import experiment, stats
from pkm_ref.data import random_batch
from pkm_ref.model import ModelConfig
from pkm_ref.train import TrainConfig, Trainer


def test_seeds_change_the_weights_and_the_batches_but_not_the_split():
    model = ModelConfig.for_profile("smoke", memory_layers=(1,))
    trainers = [Trainer(model, TrainConfig.for_profile("smoke", seed=seed)) for seed in (0, 1)]
    first, second = (trainer.splits for trainer in trainers)
    for split in ("train", "validation", "test"):  # every seed is scored on the same text
        assert torch.equal(getattr(first, split), getattr(second, split))
    weights = [trainer.model.memory_layers()[0].values.weight for trainer in trainers]
    assert not torch.equal(*weights)
    batches = [
        random_batch(t.splits.train, 4, model.block_size, t.data_generator)[0] for t in trainers
    ]
    assert not torch.equal(*batches)


def row(model: str, role: str, bpb: list[float], infer: list[float], slots: int = 0) -> dict:
    """A comparison row with one value per seed."""
    return {
        "model": model, "role": role, "layers": 2, "memory_slots": slots, "seeds": len(bpb),
        "test_bpb": stats.Estimate.of(bpb).to_json(),
        "infer_tok_s": stats.Estimate.of(infer).to_json(),
        "train_tok_s": stats.Estimate.of([v / 3 for v in infer]).to_json(),
    }  # fmt: skip


SHALLOW = row("dense-2L", "shallow", [2.10, 2.12, 2.08], [300.0, 310.0, 290.0])
DEEP = row("dense-4L", "deep", [2.20, 2.22, 2.18], [150.0, 155.0, 145.0])


@pytest.mark.parametrize(
    "bpb, infer, status",
    [
        ([1.95, 1.96, 1.94], [200.0, 205.0, 195.0], "agrees"),  # separated, the right way
        ([2.30, 2.32, 2.28], [200.0, 205.0, 195.0], "does not agree"),  # worse than deep
        ([1.95, 1.96, 1.94], [100.0, 105.0, 95.0], "does not agree"),  # slower than deep
        ([2.15, 2.25, 2.20], [200.0, 205.0, 195.0], "within noise"),  # overlaps deep's bpb
        ([1.95, 1.96, 1.94], [150.0, 160.0, 140.0], "within noise"),  # overlaps deep's speed
    ],
)
def test_headline_claim_compares_intervals(bpb, infer, status):
    memory = row("pkm-2L-n64", "memory", bpb, infer, slots=4096)
    judged, text = experiment.headline_claim([SHALLOW, DEEP, memory])
    assert judged == status
    assert "pkm-2L-n64" in text and " ± " in text


def test_headline_claim_names_the_order_of_the_intervals():
    memory = row("pkm-2L-n64", "memory", [1.95, 1.96, 1.94], [200.0, 205.0, 195.0], slots=4096)
    _, text = experiment.headline_claim([SHALLOW, DEEP, memory])
    assert "pkm-2L-n64 beats dense-4L" in text and "pkm-2L-n64 faster than dense-4L" in text
    assert "dense-4L is beaten by dense-2L" in text


@pytest.mark.parametrize(
    "bpb, status",
    [
        ([[2.02, 2.03, 2.01], [1.95, 1.96, 1.94], [1.90, 1.91, 1.89]], "agrees"),
        # the issue's case: the largest memory 0.002 better, within the seeds' spread
        ([[2.02, 2.03, 2.01], [1.935, 1.985, 1.890], [1.933, 1.983, 1.888]], "within noise"),
        ([[1.90, 1.91, 1.89], [1.95, 1.96, 1.94], [2.02, 2.03, 2.01]], "does not agree"),
    ],
)
def test_sweep_claim_needs_every_larger_memory_below_the_smaller(bpb, status):
    sweep = [
        row(f"pkm-2L-n{n}", "sweep", values, [1.0, 1.0, 1.0], slots=n * n)
        for n, values in zip((32, 64, 128), bpb, strict=True)
    ]
    judged, text = experiment.sweep_claim([SHALLOW, DEEP, *sweep])
    assert judged == status and "1,024 -> 4,096" in text and "4,096 -> 16,384" in text


def test_seeds_have_their_own_run_folders(tmp_path):
    assert experiment.run_dir(tmp_path, "dense-2L", 3) == tmp_path / "dense-2L" / "seed-3"
    assert experiment.seed_count("smoke") == 2 and experiment.seed_count("cpu") >= 3


def test_compare_refuses_repeated_seeds(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        experiment.compare("smoke", runs_dir=tmp_path, seeds=[0, 0], progress=False)


def test_plots_show_the_spread_of_the_seeds(tmp_path):
    """The sweep figure draws error bars from the lowest to the highest seed."""
    import matplotlib.pyplot as plt

    sweep = [row(f"pkm-2L-n{n}", "sweep", [2.0, 2.2, 2.1], [1.0] * 3, slots=n * n) for n in (4, 8)]
    fig = experiment.plot_memory_sweep([SHALLOW, DEEP, *sweep], "smoke")
    bars = fig.axes[0].containers[0]  # the errorbar container of the memory sizes
    (lines,) = bars.lines[2]
    segments = lines.get_segments()
    assert [tuple(s[:, 1]) for s in segments] == [pytest.approx((2.0, 2.2))] * 2
    plt.close(fig)
