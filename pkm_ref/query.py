"""The query network of a memory layer: a Linear map, then an optional normalisation.

Taught in ``notebooks/03_batchnorm_queries.ipynb``.

Batchnorm on the queries spreads them over the keys, so more memory slots get used (the paper's
query batchnorm). Two sharp edges of public implementations are avoided here:

* ``BatchNorm1d`` applied to a (batch, time, dim) tensor normalises over *time*. We always flatten
  every leading dimension first, so statistics are taken per feature over all (N, C) positions.
* Padded positions would pollute the batch statistics and the running averages.
  ``MaskedBatchNorm1d`` takes a mask and computes both over the real positions only.
* One batch with a NaN or an infinity would poison the running averages for good: every later
  input in eval mode would come out NaN. ``MaskedBatchNorm1d`` keeps its previous averages then.
* Under data parallelism (``torchrun``) each process sees a slice of the batch, and statistics of
  a slice are not those of the batch. With ``process_group`` set (``pkm_ref.distributed`` does it)
  ``MaskedBatchNorm1d`` takes its statistics over the real rows of every process, as one batch.

A third is a property, not a bug: at train time batchnorm mixes statistics across all positions of
the batch, so in a causal language model a token's query depends slightly on later tokens.
LayerNorm normalises each query on its own and has no such leak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pkm_ref import _checks
from pkm_ref.collectives import all_reduce_sum

QUERY_NORMS = ("batchnorm", "layernorm", None)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over (N, C) inputs whose statistics ignore masked-out rows.

    ``forward(x, mask)``: ``x`` (N, C); ``mask`` (N,) bool, True for real rows, or None (all real).
    In training the batch mean and biased variance over the real rows normalise *every* row, and
    the running averages are updated from the real rows only (unbiased variance, as BatchNorm1d)
    unless the update is not finite (a NaN or an infinity in the batch): then the previous
    averages stay, decided on the device without a GPU sync. In eval mode the running averages
    are used and the mask changes nothing.

    ``process_group``: None (the default), statistics of this process's rows; or a
    ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all), statistics of
    the real rows of every process in it, as SyncBatchNorm does: the sum and count of the rows,
    then the sum of squared deviations from their mean, each all-reduced (two-pass, as
    ``var(unbiased=False)``), with gradients through both. Every process must then run its
    training forward and backward passes together. In eval mode nothing is communicated.
    """

    process_group = None  # see the class docstring; set it on the instance

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"MaskedBatchNorm1d expects (N, C) input, got {tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:1]):
            raise ValueError(
                f"mask must be a bool tensor of shape ({x.shape[0]},), one entry per row of x, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if not self.training:
            return super().forward(x)
        # The batch updates copies of the running averages (autograd may keep the tensors given
        # to batch_norm, so the buffers themselves are written only once, below).
        running = None
        momentum = 0.0
        if self.track_running_stats:
            running = (self.running_mean.clone(), self.running_var.clone())  # (C,) each
            momentum = self.momentum
            if momentum is None:  # cumulative moving average, as BatchNorm1d
                momentum = 1.0 / float(self.num_batches_tracked + 1)
        if self.process_group is None and (mask is None or bool(mask.all())):
            mean, var = running if running is not None else (None, None)
            normed = F.batch_norm(x, mean, var, self.weight, self.bias, True, momentum, self.eps)
        else:
            normed = self._masked_batch_norm(x, mask, running, momentum)  # (N, C)
        if running is not None:
            self._keep_finite(*running)
        return normed  # (N, C)

    def _masked_batch_norm(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        running: tuple[torch.Tensor, torch.Tensor] | None,
        momentum: float,
    ) -> torch.Tensor:
        """Normalise ``x`` (N, C) by the statistics of its real rows (None: all rows), over every
        process of ``process_group`` if set, moving ``running`` (mean, variance) towards them in
        place."""
        # Statistics in at least float32 (under autocast x is 16-bit); the buffers keep their dtype.
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        real = (x if mask is None else x[mask]).to(stats_dtype)  # (N_real, C)
        if self.process_group is None:
            n_real = real.shape[0]
            if n_real < 2:
                raise ValueError(
                    "batchnorm needs at least 2 real (unmasked) positions in training, "
                    f"got {n_real}"
                )
            mean = real.mean(dim=0)  # (C,)
            var = real.var(dim=0, unbiased=False)  # (C,)
        else:
            # The count stays a tensor: reading it would stall the GPU at every step. Fewer than
            # 2 real rows over all processes give non-finite statistics, which the running
            # averages refuse (_keep_finite) and the trainer stops on (a non-finite loss).
            n_real, mean, var = _statistics_over_ranks(real, self.process_group)
        if running is not None:
            with torch.no_grad():
                unbiased = var * (n_real / (n_real - 1))  # (C,)
                running[0].lerp_(mean.to(running[0].dtype), momentum)
                running[1].lerp_(unbiased.to(running[1].dtype), momentum)
        normed = (x.to(stats_dtype) - mean) * torch.rsqrt(var + self.eps)  # (N, C)
        if self.affine:
            normed = normed * self.weight + self.bias
        return normed.to(x.dtype)  # (N, C)

    @torch.no_grad()
    def _keep_finite(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Take the updated averages ``mean``, ``var`` (C,) if both are finite, else keep the
        old ones; count the batch only if taken. A NaN batch makes both NaN, an infinite one
        at least the variance."""
        finite = mean.isfinite().all() & var.isfinite().all()  # (), stays on the device
        self.running_mean.copy_(torch.where(finite, mean, self.running_mean))  # (C,)
        self.running_var.copy_(torch.where(finite, var, self.running_var))  # (C,)
        self.num_batches_tracked.add_(finite.long())


def _statistics_over_ranks(
    real: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count (), mean (C,) and biased variance (C,) of the rows ``real`` (N_r, C) of every rank
    of ``group``, as if they were one batch; differentiable through both all-reduces."""
    count = real.new_full((1,), real.shape[0])  # (1,)
    sums = all_reduce_sum(torch.cat([real.sum(dim=0), count]), group)  # (C + 1,)
    n_real = sums[-1]  # ()
    mean = sums[:-1] / n_real  # (C,)
    var = all_reduce_sum((real - mean).square().sum(dim=0), group) / n_real  # (C,)
    return n_real, mean, var


class QueryNetwork(nn.Module):
    """Maps inputs to one query per head: ``q = norm(W x + b)``.

    ``forward(x, mask)``: ``x`` (N, input_dim), ``mask`` (N,) bool or None -> (N, heads, k_dim).

    ``norm``: "batchnorm" (per feature over all real positions, ``MaskedBatchNorm1d``),
    "layernorm" (each head's query on its own, one affine shared by the heads), or None.
    """

    def __init__(self, input_dim: int, k_dim: int, heads: int, norm: str | None = "batchnorm"):
        super().__init__()
        _checks.one_of("query_norm", norm, QUERY_NORMS)
        input_dim = _checks.positive_int("input_dim", input_dim)
        self.heads = _checks.positive_int("heads", heads)
        self.k_dim = _checks.positive_int("k_dim", k_dim)
        self.norm_kind = norm
        self.proj = nn.Linear(input_dim, self.heads * self.k_dim)
        if norm == "batchnorm":
            self.norm: nn.Module | None = MaskedBatchNorm1d(self.heads * self.k_dim)
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(self.k_dim)
        else:
            self.norm = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _checks.same_dtype("x", x, "the QueryNetwork's parameters", self.proj.weight)
        query = self.proj(x)  # (N, H * k_dim)
        if self.norm_kind == "batchnorm":
            query = self.norm(query, mask)  # (N, H * k_dim)
        query = query.view(-1, self.heads, self.k_dim)  # (N, H, k_dim)
        if self.norm_kind == "layernorm":
            query = self.norm(query)  # (N, H, k_dim), each head's query normalised
        return query
