"""Memory usage statistics: how evenly the slots of a memory are read.

Taught in ``notebooks/03_batchnorm_queries.ipynb``.

Over an evaluation set, count how often each slot is selected (unweighted) and the summed softmax
weight it receives (weighted), and normalise each to a distribution z over the N slots:

    usage = #{i : z_i > 0} / N                          share of slots ever read
    KL(z || uniform) = log N + sum_i z_i log z_i        0 when uniform, log N on one slot
    Gini = sum_i (2i - N - 1) z_(i) / N                 z_(i) ascending; 0 uniform, ~1 one slot

and the number of slots that hold the top 50 / 90 / 99 % of the mass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from pkm_ref import _checks

MASS_LEVELS = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class SlotDistribution:
    """Statistics of one access distribution over the slots (see the module docstring)."""

    usage: float
    kl_uniform: float
    gini: float
    slots_50: int
    slots_90: int
    slots_99: int

    @classmethod
    def from_mass(cls, mass: torch.Tensor) -> SlotDistribution:
        """Statistics of a non-negative (n_slots,) mass vector with a positive sum."""
        mass = mass.double()
        n_slots = mass.numel()
        z = mass / mass.sum()  # (N,) a distribution
        nonzero = z[z > 0]
        kl = math.log(n_slots) + float((nonzero * nonzero.log()).sum())
        ascending = z.sort().values  # (N,)
        rank = torch.arange(1, n_slots + 1, dtype=z.dtype, device=z.device)  # (N,)
        gini = float(((2 * rank - n_slots - 1) * ascending).sum()) / n_slots
        cumulative = ascending.flip(0).cumsum(0)  # (N,) mass of the i+1 heaviest slots
        heaviest = [
            min(n_slots, int(torch.searchsorted(cumulative, level - 1e-12)) + 1)
            for level in MASS_LEVELS
        ]
        return cls(float(nonzero.numel()) / n_slots, max(kl, 0.0), gini, *heaviest)


@dataclass(frozen=True)
class UsageStats:
    """Usage of a memory: by selection counts, and by softmax weight when weights were given."""

    n_slots: int
    n_reads: int
    selected: SlotDistribution
    weighted: SlotDistribution | None

    def to_dict(self) -> dict:
        return asdict(self)


class UsageAccumulator:
    """Adds up slot reads over many batches; ``result()`` gives the ``UsageStats``.

    ``update(indices, weights=None)``: ``indices`` int tensor of any shape (e.g. (N, H, knn)),
    ``weights`` the matching softmax weights or None.
    """

    def __init__(self, n_slots: int):
        self.n_slots = _checks.positive_int("n_slots", n_slots)
        self.counts = torch.zeros(n_slots, dtype=torch.float64)  # (N,) times selected
        self.weight_sums = torch.zeros(n_slots, dtype=torch.float64)  # (N,) summed weight
        self.n_reads = 0
        self._weighted = True

    def update(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        _checks.tensor("indices", indices)
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        flat = indices.reshape(-1).to(device="cpu", dtype=torch.int64)  # (R,)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.n_slots):
            raise ValueError(
                f"indices must lie in [0, n_slots={self.n_slots}), "
                f"got values in [{int(flat.min())}, {int(flat.max())}]"
            )
        self.counts += torch.bincount(flat, minlength=self.n_slots).double()
        if weights is None:
            self._weighted = False
        else:
            _checks.tensor("weights", weights)
            if weights.shape != indices.shape:
                raise ValueError(
                    f"weights must have the shape of indices {tuple(indices.shape)}, "
                    f"got {tuple(weights.shape)}"
                )
            flat_weights = weights.reshape(-1).detach().to(device="cpu", dtype=torch.float64)
            self.weight_sums.index_add_(0, flat, flat_weights)
        self.n_reads += flat.numel()

    def result(self) -> UsageStats:
        if self.n_reads == 0:
            raise ValueError("no reads recorded: call update() with at least one index first")
        weighted = None
        if self._weighted and float(self.weight_sums.sum()) > 0:
            weighted = SlotDistribution.from_mass(self.weight_sums)
        return UsageStats(
            self.n_slots, self.n_reads, SlotDistribution.from_mass(self.counts), weighted
        )


def memory_usage(
    indices: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None
) -> UsageStats:
    """Usage statistics of one batch of reads: usage and KL as the paper defines them (§4.2), Gini
    and top mass as XLM's evaluator adds them.

    Args:
        indices: int tensor of slot indices, any shape, e.g. (N, H, knn).
        n_slots: number of slots N in the memory.
        weights: the softmax weights of those reads (same shape), or None.

    Returns:
        ``UsageStats`` with ``selected`` (from counts) and ``weighted`` (from weights, or None).
        Use ``UsageAccumulator`` to add up many batches.
    """
    accumulator = UsageAccumulator(n_slots)
    accumulator.update(indices, weights)
    return accumulator.result()
