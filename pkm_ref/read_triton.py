"""The value read and its backward as Triton kernels: the GPU path of ``pkm_ref.read``.

Taught in ``notebooks/04_multihead_memory_gpu.ipynb`` (the read); ``read_bags(...,
method="triton")`` is the way in. Imported only on first use, so ``import pkm_ref`` never imports
Triton. On CPU tensors the kernels run under Triton's interpreter, which is how the tests check
them on machines without a GPU: ``TRITON_INTERPRET=1`` must be set before Triton is first imported
in the process, since Triton picks compiled or interpreted code when it decorates a kernel (its
own helpers included, decorated on ``import triton``).

Shapes: a table V (N, D), B bags of J reads each with slots I (B, J) and weights W (B, J), and
R = B * J reads in all. Each kernel next to the torch code it must equal:

    forward       out[m] = sum_j W[m, j] * V[I[m, j]]                                  (B, D)
                  torch: (V[I] * W[..., None]).sum(1)                  (pkm_ref.read.gather_sum)
                  kernel: _bag_read_kernel, one program per (bag, D tile)

    weights grad  dW[m, j] = <dout[m], V[I[m, j]]>                                    (B, J)
                  torch: (V[I] * dout[:, None, :]).sum(-1)
                  kernel: _weight_grad_kernel, one program per (bag, J tile)

    table grad    dV[s] = sum over the reads (m, j) with I[m, j] = s of W[m, j] * dout[m]  (N, D)
                  torch: zeros(N, D).index_add_(0, I.flatten(), W.flatten()[:, None] * dout[bag])
                  kernel: _slot_sum_kernel, one program per (slot that was read, D tile)

**Why the forward can run at memory speed.** Per bag it moves J rows of D values (J * D *
itemsize bytes: 128 KiB for J = 4 heads x 32 reads, D = 256, float32; 64 KiB in bfloat16), J
indices and weights (8 + 4 bytes a read, 1.5 KiB) and one float32 output row (D * 4 bytes, 1 KiB):
the rows are 96-98 % of the bytes, and each is read once. A program loads a BLOCK_J x BLOCK_D tile
of rows per step: BLOCK_J independent rows, each a contiguous run of BLOCK_D values (1 KiB: whole
128-byte lines, 16-byte vectors per thread), all issued before the first is used. With the tiles
below that is 16-32 KiB in flight per program and several programs per multiprocessor. Little's
law asks for bandwidth x latency in flight: at ~4.4 TB/s (the H200's measured copy bandwidth) and a
latency of the order of a microsecond, a few MB over 132 multiprocessors, some tens of KiB each.
EmbeddingBag moved 1.2-2.0 TB/s there and the compiled gather-sum 2.4-2.6 TB/s
(``figures/gpu/bench_retrieval.md``); whether these kernels reach the 70 % target is measured on
a GPU, not asserted here.

**Why the backward is deterministic.** Two reads of one slot must add into one row. Atomic float
adds would make the sum's order, and so its last bits, depend on timing. Instead the R reads are
sorted by slot (a stable sort: equal slots keep the order (m, j)), each slot's reads form one
segment, and one program sums a segment in that fixed order: two runs give the same bits. The
weights' gradient writes each (m, j) once and needs nothing of the kind. A slot read r times costs
its program r / BLOCK_R steps: a memory whose reads collapse onto a few slots has a slow (still
correct) backward.

Sizes: block shapes are powers of two and the tails (D or J not a power of two) are masked. D and
J are compile-time constants (one compilation per layer shape; loops over them have fixed bounds),
addresses are int64 (N * D may exceed 2^31), and every sum is taken in float32 (float64 for a
float64 table, which the gradient tests use). The output is that sum, unrounded (float32 for a
bfloat16 table: ``pkm_ref.read.sum_dtype``); the table's gradient has the table's dtype. Slots
outside [0, N) read zeros and get no gradient; the layers never produce them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pkm_ref import _checks, _triton
from pkm_ref.read import sum_dtype

# Decided when this module is imported, as Triton decides for the kernels below.
INTERPRETED = bool(triton.knobs.runtime.interpret)

TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Reads per step of the table-gradient kernel: a slot is read ~2 times on average by 16,384 bags
# of 128 reads from 2^20 slots, so wider steps would mostly be masked lanes.
_SLOT_BLOCK_READS = 8


def bag_read(
    table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """``out[m] = sum_j weights[m, j] * table[indices[m, j]]`` by Triton kernels, with autograd.

    Args:
        table: (N, D) float32, bfloat16, float16 or float64, on CUDA (or on CPU when
            ``INTERPRETED``).
        indices: (B, J) int64 or int32 slots.
        weights: (B, J) floating.
        sparse: the table's gradient as a coalesced sparse COO tensor holding only the rows read
            (for ``SparseAdam``), instead of a dense (N, D) one.

    Returns:
        (B, D) in the dtype the kernels sum in: that of ``table`` and ``weights``, at least
        float32. Gradients flow to ``table`` and ``weights``, both computed deterministically.
    """
    _check_inputs(table, indices, weights)
    weights = weights.to(sum_dtype(table, weights))  # (B, J): the kernels sum in their dtype
    return _BagRead.apply(  # (B, D)
        table.contiguous(), indices.contiguous(), weights.contiguous(), sparse
    )


def _check_inputs(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    for name, value in (("table", table), ("indices", indices), ("weights", weights)):
        _checks.tensor(name, value)
    if table.dim() != 2 or table.dtype not in TABLE_DTYPES:
        raise TypeError(
            f"table must be (N, D) with a dtype in {list(TABLE_DTYPES)}, got "
            f"{table.dtype} {tuple(table.shape)}"
        )
    if indices.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"indices must be (B, J) int64 or int32, got {indices.dtype} {tuple(indices.shape)}"
        )
    if weights.shape != indices.shape or not weights.is_floating_point():
        raise TypeError(
            f"weights must be floating with the shape of indices {tuple(indices.shape)}, got "
            f"{weights.dtype} {tuple(weights.shape)}"
        )
    devices = {table.device, indices.device, weights.device}
    if len(devices) > 1:
        raise ValueError(f"table, indices and weights must be on one device, got {devices}")
    _triton.check_runnable(
        table.device,
        INTERPRETED,
        'read_bags(method="triton")',
        'method="embedding_bag" (the default)',
    )


class _BagRead(torch.autograd.Function):
    """Ties the forward kernel to its two backward kernels."""

    @staticmethod
    def forward(ctx, table, indices, weights, sparse):
        ctx.save_for_backward(table, indices, weights)
        ctx.sparse = sparse
        return _read(table, indices, weights)  # (B, D)

    @staticmethod
    def backward(ctx, grad_out):
        table, indices, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # (B, D)
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = _table_grad(grad_out, indices, weights, table, ctx.sparse)
        if ctx.needs_input_grad[2]:
            grad_weights = _weight_grad(grad_out, table, indices)  # (B, J)
        return grad_table, None, grad_weights, None


def _tiles(reads: int, width: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_D, num_warps) of the kernels that walk a bag's rows.

    BLOCK_D covers 1 KiB of a row (256 float32, 512 bfloat16 values), or a shorter row whole;
    BLOCK_J up to 32 rows a step and up to 8,192 values a tile (32 KiB of float32 loads in flight,
    16 KiB of bfloat16); warps enough for 32 values a thread (8 for a full tile), which leaves
    registers for several programs per multiprocessor. Untuned: a GPU run can sweep them.
    """
    block_d = min(triton.next_power_of_2(width), 1024 // itemsize)
    block_j = min(triton.next_power_of_2(max(reads, 1)), 32, max(8192 // block_d, 1))
    num_warps = min(max(block_j * block_d // 1024, 1), 8)
    return block_j, block_d, num_warps


# --- forward ---------------------------------------------------------------------------------


@triton.jit
def _bag_read_kernel(
    table_ptr,  # (N, D) values
    indices_ptr,  # (B, J) slots
    weights_ptr,  # (B, J) float32 (float64) weights
    out_ptr,  # (B, D) in the weights' dtype
    n_slots,  # N: reads outside [0, N) are masked
    J: tl.constexpr,
    D: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)  # int64: bag * D may exceed 2^31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D  # (BLOCK_D,): D need not be a power of two
    # One partial sum per row of the tile, reduced over the rows once, after the loop: a
    # reduction across warps in every step would put a barrier between the steps' loads.
    partial = tl.zeros([BLOCK_J, BLOCK_D], dtype=weights_ptr.dtype.element_ty)  # fp32 sums
    for start in range(0, J, BLOCK_J):
        reads = start + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        read_ok = reads < J  # (BLOCK_J,): J need not be a power of two either
        slots = tl.load(indices_ptr + bag * J + reads, mask=read_ok, other=0).to(tl.int64)
        weight = tl.load(weights_ptr + bag * J + reads, mask=read_ok, other=0.0)  # (BLOCK_J,)
        in_table = read_ok & (slots >= 0) & (slots < n_slots)  # (BLOCK_J,)
        rows = tl.load(  # (BLOCK_J, BLOCK_D): BLOCK_J rows in flight at once
            table_ptr + slots[:, None] * D + cols[None, :],
            mask=in_table[:, None] & col_ok[None, :],
            other=0.0,
        )
        partial += rows.to(partial.dtype) * weight[:, None]  # (BLOCK_J, BLOCK_D)
    total = tl.sum(partial, axis=0)  # (BLOCK_D,)
    tl.store(out_ptr + bag * D + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def _read(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    (bags, reads), width = indices.shape, table.shape[1]
    out = weights.new_empty(bags, width)  # (B, D), summed in the weights' dtype
    if indices.numel() == 0:
        return out.zero_()  # no bags, or empty ones: nothing to launch
    block_j, block_d, num_warps = _tiles(reads, width, table.element_size())
    grid = (bags, triton.cdiv(width, block_d))
    _bag_read_kernel[grid](
        table, indices, weights, out, table.shape[0],
        J=reads, D=width, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


# --- backward: the weights ---------------------------------------------------------------------


@triton.jit
def _weight_grad_kernel(
    grad_out_ptr,  # (B, D) float32 (float64)
    table_ptr,  # (N, D)
    indices_ptr,  # (B, J)
    grad_weights_ptr,  # (B, J) float32 (float64)
    n_slots,
    J: tl.constexpr,
    D: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    reads = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
    read_ok = reads < J
    slots = tl.load(indices_ptr + bag * J + reads, mask=read_ok, other=0).to(tl.int64)
    in_table = read_ok & (slots >= 0) & (slots < n_slots)  # (BLOCK_J,)
    partial = tl.zeros([BLOCK_J, BLOCK_D], dtype=grad_weights_ptr.dtype.element_ty)  # sums
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_ok = cols < D
        grad = tl.load(grad_out_ptr + bag * D + cols, mask=col_ok, other=0.0)  # (BLOCK_D,)
        rows = tl.load(  # (BLOCK_J, BLOCK_D)
            table_ptr + slots[:, None] * D + cols[None, :],
            mask=in_table[:, None] & col_ok[None, :],
            other=0.0,
        )
        partial += rows.to(partial.dtype) * grad[None, :]  # (BLOCK_J, BLOCK_D)
    dots = tl.sum(partial, axis=1)  # (BLOCK_J,)
    tl.store(grad_weights_ptr + bag * J + reads, dots, mask=read_ok)


def _weight_grad(grad_out: torch.Tensor, table: torch.Tensor, indices: torch.Tensor):
    (bags, reads), width = indices.shape, table.shape[1]
    grad_weights = grad_out.new_zeros(bags, reads)  # (B, J) in the weights' dtype
    if indices.numel() == 0:
        return grad_weights
    block_j, block_d, num_warps = _tiles(reads, width, table.element_size())
    grid = (bags, triton.cdiv(reads, block_j))
    _weight_grad_kernel[grid](
        grad_out, table, indices, grad_weights, table.shape[0],
        J=reads, D=width, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return grad_weights


# --- backward: the table, deterministic ----------------------------------------------------------


@triton.jit
def _slot_sum_kernel(
    grad_out_ptr,  # (B, D) float32 (float64)
    weights_ptr,  # (R,) = (B, J) flattened, float32 (float64)
    order_ptr,  # (R,) read positions m * J + j, sorted by slot (stable)
    starts_ptr,  # (U,) each slot's first position in order
    ends_ptr,  # (U,) one past its last
    out_rows_ptr,  # (U,) the output row of each slot
    out_ptr,  # (N, D) dense gradient, or (U, D) rows of a sparse one, in the table's dtype
    J: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    start = tl.load(starts_ptr + segment)  # int64
    end = tl.load(ends_ptr + segment)
    partial = tl.zeros([BLOCK_R, BLOCK_D], dtype=weights_ptr.dtype.element_ty)  # sums
    # A while loop: its bounds come from memory (a for loop over them fails in the 3.6 interpreter).
    position = start
    while position < end:
        positions = position + tl.arange(0, BLOCK_R)  # (BLOCK_R,) in sorted order
        ok = positions < end
        reads = tl.load(order_ptr + positions, mask=ok, other=0)  # (BLOCK_R,) m * J + j
        weight = tl.load(weights_ptr + reads, mask=ok, other=0.0)  # (BLOCK_R,)
        bags = reads // J  # (BLOCK_R,) m
        grads = tl.load(  # (BLOCK_R, BLOCK_D) the output gradients of the bags that read the slot
            grad_out_ptr + bags[:, None] * D + cols[None, :],
            mask=ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        partial += grads.to(partial.dtype) * weight[:, None]  # (BLOCK_R, BLOCK_D)
        position += BLOCK_R
    total = tl.sum(partial, axis=0)  # (BLOCK_D,)
    out_row = tl.load(out_rows_ptr + segment)  # int64
    tl.store(out_ptr + out_row * D + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def _table_grad(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    sparse: bool,
) -> torch.Tensor:
    """The table's gradient in its dtype: dense (N, D), or sparse COO with unique, sorted
    (coalesced) rows."""
    reads, (n_slots, width) = indices.shape[1], table.shape
    sorted_slots, order = torch.sort(indices.flatten(), stable=True)  # (R,) each
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)  # (U,) each
    ends = counts.cumsum(0)  # (U,) segment of slot u: order[starts[u]:ends[u]]
    starts = ends - counts  # (U,)
    in_table = (slots >= 0) & (slots < n_slots)  # reads outside the table get no gradient
    slots, starts, ends = slots[in_table], starts[in_table], ends[in_table]  # (U,) each
    if sparse:
        out = table.new_empty(len(slots), width)  # (U, D): one row per slot read
        out_rows = torch.arange(len(slots), device=table.device)  # (U,)
    else:
        out = table.new_zeros(n_slots, width)  # (N, D): rows never read stay zero
        out_rows = slots  # (U,)
    if len(slots):
        _, block_d, num_warps = _tiles(_SLOT_BLOCK_READS, width, grad_out.element_size())
        grid = (len(slots), triton.cdiv(width, block_d))
        _slot_sum_kernel[grid](
            grad_out, weights, order, starts, ends, out_rows, out,
            J=reads, D=width, BLOCK_R=_SLOT_BLOCK_READS, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    if not sparse:
        return out
    return torch.sparse_coo_tensor(  # (N, D) holding U rows
        slots.unsqueeze(0), out, (n_slots, width), is_coalesced=True, check_invariants=False
    )
