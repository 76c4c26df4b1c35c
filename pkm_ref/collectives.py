"""Collective communication that autograd can differentiate through.

Not taught in a notebook (a notebook is one process): see the README's "More than one GPU".

Two operations, each with the gradient of the global computation it takes part in:

* ``all_reduce_sum(x)``: every rank gets ``y = sum_r x_r``. The gradient of every rank's loss
  reaches every ``x_r``: ``dx_r = sum_r' dy_r'`` (an all-reduce again). The memory's query
  batchnorm uses it for batch statistics over all ranks (``MaskedBatchNorm1d.process_group``).
* ``exchange(x, send_counts, receive_counts)``: rank r sends ``send_counts[s]`` rows of ``x`` to
  each rank s (in rank order) and receives ``receive_counts[s]`` rows from each: an
  ``all_to_all_single`` with uneven splits. Its gradient goes back the same way, reversed. The
  sharded value table (``pkm_ref.sharded_values``) routes its reads with it.

Both are collectives: every rank of ``group`` must call them, in the same order, forward and
backward. They need ``torch.distributed`` to be initialised; gloo (CPU) and NCCL (CUDA) both
implement them (gloo's ``all_to_all_single``, uneven splits included, since torch 1.6).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``sum_r tensor_r`` over the ranks of ``group`` (None: all), on every rank; differentiable.

    A new tensor of the shape of ``tensor``; ``tensor`` itself is left alone.
    """
    return _AllReduceSum.apply(tensor, group)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group
    ) -> torch.Tensor:
        ctx.counts, ctx.group = (send_counts, receive_counts), group
        return _all_to_all(tensor, send_counts, receive_counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        send_counts, receive_counts = ctx.counts
        return _Exchange.apply(grad, receive_counts, send_counts, ctx.group), None, None, None


def _all_to_all(
    tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group
) -> torch.Tensor:
    received = tensor.new_empty((sum(receive_counts), *tensor.shape[1:]))  # (R, ...)
    dist.all_to_all_single(received, tensor.contiguous(), receive_counts, send_counts, group=group)
    return received


def exchange(
    tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group=None
) -> torch.Tensor:
    """Send rows of ``tensor`` to every rank and receive theirs; differentiable.

    Args:
        tensor: (S, ...) rows to send, grouped by destination: the first ``send_counts[0]`` go
            to rank 0, the next ``send_counts[1]`` to rank 1, and so on (S = sum(send_counts)).
        send_counts, receive_counts: one int per rank of ``group``; ``receive_counts[s]`` must
            equal what rank s sends here (its ``send_counts[this rank]``).

    Returns:
        (R, ...) the rows received, grouped by source rank in rank order (R = sum(receive_counts)).
        Integer tensors (indices) travel too, without a gradient.
    """
    if tensor.is_floating_point():
        return _Exchange.apply(tensor, send_counts, receive_counts, group)
    return _all_to_all(tensor, send_counts, receive_counts, group)
