"""The value read of a memory layer: a weighted sum of table rows per bag.

Taught in ``notebooks/04_multihead_memory_gpu.ipynb``.

One job, three ways to do it. For every bag m (a token; the H heads' knn reads all go in one bag),

    out[m] = sum_j weights[m, j] * table[indices[m, j]]      table (N, D), indices (B, J) -> (B, D)

* ``method="embedding_bag"`` (the default): ``F.embedding_bag`` with per-sample weights, one
  kernel that never materialises the (B, J, D) gathered rows; with ``sparse=True`` its gradient
  for the table is row-sparse.
* ``method="compiled"``: ``gather_sum`` under ``torch.compile``, one fused pass over the rows read
  (about twice EmbeddingBag's bandwidth on an H200, slower on CPU); dense gradient only.
* ``method="triton"``: the Triton kernels of ``pkm_ref.read_triton`` (CUDA, or CPU tensors under
  Triton's interpreter): several rows in flight per program, fp32 accumulation, a deterministic
  backward, dense or row-sparse.

``gather_sum`` is the definition every method must equal. Every method returns the dtype it sums
in, at least float32 (``sum_dtype``): a bfloat16 table (``value_dtype`` of the layers) is read in
bfloat16, half the bytes, and summed into a float32 output that is never rounded to 16 bits, so a
layer with a bfloat16 table still hands float32 to the float32 model around it. (EmbeddingBag
alone takes its weights, and gives its sum, in the table's dtype: rounded to bfloat16 there.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pkm_ref import _checks, _triton

READ_METHODS = ("embedding_bag", "compiled", "triton")
_TRITON_CALLER = 'read_bags(method="triton")'


def sum_dtype(table: torch.Tensor, weights: torch.Tensor) -> torch.dtype:
    """The dtype a read sums in and returns: that of ``table`` and ``weights``, at least float32."""
    return torch.promote_types(torch.promote_types(table.dtype, weights.dtype), torch.float32)


def gather_sum(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The value read as plain tensor ops: ``out[b] = sum_j weights[b, j] * table[indices[b, j]]``.

    table (N, D); indices, weights (B, J) -> (B, D) in ``sum_dtype`` (float32 for a bfloat16
    table). Run eagerly it materialises the (B, J, D) rows it gathers (notebook 04 measures that
    cost); under ``torch.compile`` it becomes one fused pass over the rows read. Its gradient for
    ``table`` is dense.
    """
    rows = table[indices]  # (B, J, D) in the table's dtype
    return (rows * weights.to(sum_dtype(table, weights)).unsqueeze(-1)).sum(dim=1)  # (B, D)


@functools.cache
def compiled_gather_sum():
    """``gather_sum`` under ``torch.compile``, built once per process.

    Shapes are static (each new table or batch shape compiles once more): with dynamic shapes the
    value size D becomes symbolic and the fused read lost half its speed on an H200.
    """
    return torch.compile(gather_sum, dynamic=False)


def read_bags(
    table: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    method: str = "embedding_bag",
    sparse: bool = False,
) -> torch.Tensor:
    """The memory read: ``out[b] = sum_j weights[b, j] * table[indices[b, j]]``.

    Args:
        table: (N, D) floating values (float32, or bfloat16 for half the bytes read).
        indices: (B, J) integer slots in [0, N).
        weights: (B, J) floating weights (the layer's float32 softmax).
        method: one of ``READ_METHODS`` (see the module docstring).
        sparse: a row-sparse gradient for ``table`` (``"embedding_bag"`` and ``"triton"``).

    Returns:
        (B, D) in ``sum_dtype(table, weights)``: float32 for float32 or bfloat16 tables.
    """
    _checks.one_of("method", method, READ_METHODS)
    if method == "compiled":
        if sparse:
            raise ValueError(
                'method="compiled" gives the table a dense gradient; use sparse=False, or '
                'method="embedding_bag" or "triton" for a sparse one'
            )
        return compiled_gather_sum()(table, indices, weights)  # (B, D)
    if method == "triton":
        kernels = _triton.import_kernels("read_triton", _TRITON_CALLER, 'method="embedding_bag"')
        return kernels.bag_read(table, indices, weights, sparse)  # (B, D)
    out = F.embedding_bag(  # (B, D) in the table's dtype: it needs the weights in it too
        indices, table, per_sample_weights=weights.to(table.dtype), mode="sum", sparse=sparse
    )
    return out.to(sum_dtype(table, weights))  # (B, D)
