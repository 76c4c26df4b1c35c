"""The usage metrics: uniform access gives KL 0 and usage 1; one slot gives KL log N."""

import math

import pytest
import torch

from pkm_ref import UsageAccumulator, memory_usage


def test_uniform_access():
    stats = memory_usage(torch.arange(64).repeat(3), n_slots=64)
    assert stats.selected.usage == 1.0
    assert stats.selected.kl_uniform == pytest.approx(0.0, abs=1e-12)
    assert stats.selected.gini == pytest.approx(0.0, abs=1e-12)
    assert (stats.selected.slots_50, stats.selected.slots_90, stats.selected.slots_99) == (
        32,
        58,
        64,
    )
    assert stats.weighted is None


def test_all_mass_on_one_slot():
    stats = memory_usage(torch.full((10, 4), 7), n_slots=100, weights=torch.rand(10, 4))
    for dist in (stats.selected, stats.weighted):
        assert dist.usage == pytest.approx(0.01)
        assert dist.kl_uniform == pytest.approx(math.log(100))
        assert dist.gini == pytest.approx(0.99)
        assert (dist.slots_50, dist.slots_90, dist.slots_99) == (1, 1, 1)


def test_weighted_differs_from_counts():
    indices = torch.tensor([[0, 1], [0, 1]])
    weights = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    stats = memory_usage(indices, n_slots=2, weights=weights)
    assert stats.selected.kl_uniform == pytest.approx(0.0, abs=1e-12)
    expected = math.log(2) + 0.9 * math.log(0.9) + 0.1 * math.log(0.1)
    assert stats.weighted.kl_uniform == pytest.approx(expected)


def test_accumulator_equals_one_big_batch():
    torch.manual_seed(0)
    indices = torch.randint(0, 50, (30, 2, 4))
    weights = torch.rand(30, 2, 4)
    accumulator = UsageAccumulator(50)
    for chunk, chunk_weights in zip(indices.split(7), weights.split(7), strict=True):
        accumulator.update(chunk, chunk_weights)
    assert accumulator.result() == memory_usage(indices, 50, weights)
    assert accumulator.result().n_reads == 240


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_slots"):
        memory_usage(torch.tensor([5]), n_slots=5)
    with pytest.raises(ValueError, match="n_slots"):
        memory_usage(torch.tensor([-1]), n_slots=5)
    with pytest.raises(TypeError, match="integer"):
        memory_usage(torch.tensor([0.5]), n_slots=5)
    with pytest.raises(ValueError, match="shape of indices"):
        memory_usage(torch.tensor([1, 2]), n_slots=5, weights=torch.ones(3))
    with pytest.raises(ValueError, match="no reads"):
        UsageAccumulator(4).result()
    with pytest.raises(ValueError, match="n_slots must be >= 1"):
        UsageAccumulator(0)
