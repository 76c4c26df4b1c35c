"""The product-key search fused into one Triton kernel: ``product_topk(..., method="triton")``.

The search it must equal is taught in ``notebooks/02_product_keys.ipynb`` (the per-half top-k and
the staircase) and ``notebooks/06_complexity_and_speed.ipynb`` (the fast torch path); read this
module beside ``pkm_ref.search._product_topk_fast``. ``pkm_ref.search`` imports it only when
``method="triton"`` is asked for, so ``import pkm_ref`` never needs triton.

Why a kernel. On a GPU the torch path writes every query's (H, 2, n) sub-key scores to memory,
reads them back to rank them, writes int64 indices, gathers, ranks again: about 20 kernels, and
per query and head about 8 KiB written and read again at n = 1024 (fp32), for a result of 32 slot
ids. The kernel keeps everything between the query and the winners in registers.

One program takes ``BLOCK_M`` queries of one head (grid: ``(cdiv(M, BLOCK_M), H)``, the programs
of one head side by side so that its sub-keys stay in L2). Step by step, with the torch code each
step equals (shapes per program; ``K_P``, ``C_P``, ``KNN_P`` are powers of two at least k', C and
knn, the places past the real sizes masked out):

1. Sub-key scores, one half at a time, ``BLOCK_N`` sub-keys at a time (``_half_topk``)::

       half_scores = einsum("mhtd,htnd->mhtn", halves, subkeys)     # torch: (M, H, 2, n)
       acc = tl.dot(q, tl.trans(c), acc, input_precision="ieee")    # (BLOCK_M, BLOCK_N) fp32

   ``BLOCK_D`` dimensions per ``tl.dot``. float32 inputs use IEEE fp32 products on the CUDA
   cores (not TF32), so the scores are torch's fp32 matmul's up to summation order; 16-bit inputs
   go to the tensor cores (``mma.sync``: ``wgmma`` needs 64 rows per warp group), accumulate in
   fp32 and are rounded to their dtype, as torch's matmul rounds its output (``_rounded``).

2. Pack each (score, sub-key id) into one int64 key, since ``tl.topk`` sorts values and returns
   no indices (``_pack``): the high 32 bits are the float's bits made order-preserving as signed
   integers (the trick of ``search._int_topk``), the low 32 bits ``2^31 - 1 - id``. Comparing two
   keys compares the scores, and on equal scores the smaller id wins.

3. The per-half top-k', k' = min(knn, n), without ever holding all n scores::

       top_scores, top_idx = half_scores.topk(k', dim=-1)           # torch: (M, H, 2, k')
       best = bitonic_merge(max(best, flip(tl.topk(keys, K_P))))    # (BLOCK_M, K_P), descending

   A running best list is merged with each block's own top ``K_P``: with both sorted, the
   element-wise max of one and the other reversed is the top ``K_P`` of the two, as a bitonic
   sequence, which ``tl.bitonic_merge`` sorts in log2(K_P) steps.

4. The staircase candidates (``search.staircase``): the C rank pairs with (r1+1)(r2+1) <= knn,
   loaded once as codes ``r1 * K_P + r2`` (C_P,), and the sorted half scores gathered::

       cand = top_scores[..., 0, rank1] + top_scores[..., 1, rank2]  # torch: (M, H, C)
       total = tl.gather(s1, r1, 1) + tl.gather(s2, r2, 1)          # (BLOCK_M, C_P)

   The sum is rounded to the query dtype, as torch's addition of two such tensors is.

5. The final top-knn, on keys packed from (total, code)::

       pos = topk(cand, knn)                                        # torch: (M, H, knn)
       top = tl.topk(keys, KNN_P)                                   # (BLOCK_M, KNN_P)

6. Slot ids for the winners only, ``id1[r1] * n + id2[r2]`` (int64), and their scores are
   stored: (M, H, knn) each. Nothing else goes to memory: no half scores, no index tensors.

Ties. Each half ranks its sub-keys by (score descending, id ascending); candidates are ranked by
(total descending, then (r1, r2) in lexicographic order), which is the order of the codes. Under
this total order the staircase stays exact even when rounding makes sums equal: the candidate at
1-based ranks (i, j) with i * j > knn has i * j - 1 >= knn others (i' <= i, j' <= j), each with
a total at least its own (rounded addition is monotone) and each earlier in (r1, r2) order, so
each beats it: it cannot be in the top knn. The result is the top knn of all n^2 slots under one
deterministic order: always a valid top knn, and the same set as ``method="reference"`` unless
the knn-th score is tied (or, in float32, within the last bit that another summation order can
change). Scores are assumed finite (NaN has no order).

Registers and blocks. The widest tiles are the block's keys (BLOCK_M, BLOCK_N) and the
candidates (BLOCK_M, C_P), int64, sorted in registers: ``_blocks`` keeps them at 4,096 keys per
program, 16 per thread at 8 warps, or 32 per thread for a staircase of 512. Compiled for sm_90a
with Triton 3.6 (no GPU needed for that, see ``_compile_ahead`` and its test), ptxas reports no
spills at knn 32 over n = 1024 (BLOCK_M 32, BLOCK_N 128, BLOCK_D 32, 8 warps, about 200 to 230
registers per thread) nor for the widest staircase allowed, C_P = 512 (knn up to 105 when
n >= knn), and spills at C_P = 1024. Wider staircases do not fit (``fits``): ``product_topk``
then takes the fast torch path, which gives the same exact set. The block sizes are a
deterministic heuristic, not autotuned, so that every run sums in the same order; tuning them is
work for a GPU.

Memory traffic per query and head at n = 1024, k_dim 128, knn 32, fp32 (estimates: not timed):
the kernel reads the query (512 B) and writes knn scores and slot ids (384 B), about 0.9 KB; each
program reads its head's 512 KiB of sub-keys from L2 (from HBM about once per head). The torch
path writes and re-reads the half scores (2 x 8 KiB) and moves some 10-20 KiB more in its
selects, gathers and index arithmetic: about 30x the kernel's HBM bytes, in about 20 launches.
The kernel does the same fp32 multiply-adds on the CUDA cores (tensor cores for 16-bit queries)
and about 20 int64 compare-exchange steps per sub-key score in its sorts. What it costs on an
H100/H200 must be measured there (``python -m pkm_ref bench``); block sizes too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from pkm_ref.search import _staircase

# The packed key of an empty place (a padded sub-key or candidate): below every key of a score that
# is not NaN, and its rank reads as 0, so that decoding it never indexes out of bounds.
_EMPTY = tl.constexpr(-(2**63) + 0x7FFFFFFF)


@triton.jit
def _ordered_bits(x):
    """float32 -> int32 whose signed order is the order of the floats (-0.0 just below +0.0).

    The bits of a non-negative float already order as integers; flipping all but the sign bit of
    a negative one reverses their order. The flip undoes itself, so it also decodes."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack(score, rank):
    """One int64 key per (score, rank), 0 <= rank < 2^31: score's ordered bits high, then
    2^31 - 1 - rank, so that of two equal scores the smaller rank has the larger key."""
    return (_ordered_bits(score).to(tl.int64) << 32) | (0x7FFFFFFF - rank).to(tl.int64)


@triton.jit
def _unpack_score(key):
    """The float32 score of a packed key."""
    return _ordered_bits((key >> 32).to(tl.int32)).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_rank(key):
    """The rank of a packed key (int32)."""
    return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to the nearest ``dtype`` value (ties to even), back in float32, as
    torch rounds a matmul's or an addition's float32 result to a 16-bit dtype.

    bfloat16 by integer arithmetic (add half a unit of the 16 bits dropped, plus the last kept bit
    for ties to even, then drop them): the 3.6 interpreter's cast truncates instead of rounding.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _half_topk(
    q_ptr,
    c_ptr,
    rows,
    row_ok,
    stride_qm,
    n_keys,
    half,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_P: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Steps 1-3 for one query half: its top K_P sub-keys as packed keys, sorted descending.

    q_ptr: this head's first query entry of the half (rows at ``rows * stride_qm``); c_ptr: the
    half's (n, half) sub-keys, contiguous. Returns (BLOCK_M, K_P) int64.
    """
    best = tl.full((BLOCK_M, K_P), _EMPTY, tl.int64)  # (BLOCK_M, K_P) running top, descending
    start = 0
    while start < n_keys:  # `while`: a `for` over a run-time bound fails in the 3.6 interpreter
        ids = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) sub-key ids
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # (BLOCK_M, BLOCK_N)
        d0 = 0
        while d0 < half:
            dims = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            q = tl.load(
                q_ptr + rows[:, None] * stride_qm + dims[None, :],
                mask=row_ok[:, None] & (dims < half)[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            c = tl.load(
                c_ptr + ids[:, None] * half + dims[None, :],
                mask=(ids < n_keys)[:, None] & (dims < half)[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            if DOT_IN_FP32:  # only under the 3.6 interpreter: its bfloat16 dot is wrong
                q = q.to(tl.float32)
                c = c.to(tl.float32)
            acc = tl.dot(q, tl.trans(c), acc, input_precision="ieee")  # (BLOCK_M, BLOCK_N)
            d0 += BLOCK_D
        scores = _rounded(acc, q_ptr.dtype.element_ty)  # (BLOCK_M, BLOCK_N) as torch's matmul
        keys = tl.where((ids < n_keys)[None, :], _pack(scores, ids), _EMPTY)  # (BLOCK_M, BLOCK_N)
        top = tl.topk(keys, K_P)  # (BLOCK_M, K_P) descending
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), descending=True)
        start += BLOCK_N
    return best


@triton.jit
def _product_search_kernel(
    q_ptr,
    c_ptr,
    codes_ptr,
    scores_ptr,
    slots_ptr,
    n_queries,
    heads,
    n_keys,
    half,
    knn,
    n_candidates,
    stride_qm,
    stride_qh,
    stride_qt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_P: tl.constexpr,
    C_P: tl.constexpr,
    KNN_P: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Top-knn product keys of BLOCK_M queries of one head (steps 1-6 of the module docstring).

    q_ptr: (M, H, 2, half) queries, strides (stride_qm, stride_qh, stride_qt, 1); c_ptr:
    (H, 2, n, half) sub-keys, contiguous; codes_ptr: (C,) staircase codes r1 * K_P + r2.
    Writes scores_ptr (M, H, knn) in the query dtype and slots_ptr (M, H, knn) int64.
    """
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query ids
    row_ok = rows < n_queries
    rows = rows.to(tl.int64)
    q_head = q_ptr + head * stride_qh
    c_head = c_ptr + head * 2 * n_keys * half
    # Steps 1-3, per half: (BLOCK_M, K_P) packed (score, sub-key id), best first.
    best1 = _half_topk(
        q_head,
        c_head,
        rows,
        row_ok,
        stride_qm,
        n_keys,
        half,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        K_P,
        DOT_IN_FP32,
    )
    best2 = _half_topk(
        q_head + stride_qt,
        c_head + n_keys * half,
        rows,
        row_ok,
        stride_qm,
        n_keys,
        half,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        K_P,
        DOT_IN_FP32,
    )
    s1 = _unpack_score(best1)  # (BLOCK_M, K_P) float32, descending
    s2 = _unpack_score(best2)  # (BLOCK_M, K_P)
    # Step 4: the staircase candidates s1[r1] + s2[r2].
    cand = tl.arange(0, C_P)  # (C_P,)
    is_cand = cand < n_candidates  # (C_P,)
    codes = tl.load(codes_ptr + cand, mask=is_cand, other=0)  # (C_P,) r1 * K_P + r2
    r1 = tl.broadcast_to((codes // K_P)[None, :], (BLOCK_M, C_P))  # (BLOCK_M, C_P)
    r2 = tl.broadcast_to((codes % K_P)[None, :], (BLOCK_M, C_P))  # (BLOCK_M, C_P)
    total = tl.gather(s1, r1, 1) + tl.gather(s2, r2, 1)  # (BLOCK_M, C_P)
    total = _rounded(total, q_ptr.dtype.element_ty)  # (BLOCK_M, C_P) as torch's addition
    keys = tl.where(is_cand[None, :], _pack(total, codes[None, :]), _EMPTY)  # (BLOCK_M, C_P)
    # Step 5: the final top-knn, ties to the smaller (r1, r2).
    top = tl.topk(keys, KNN_P)  # (BLOCK_M, KNN_P) descending
    # Step 6: slot ids of the winners, id1[r1] * n + id2[r2], and their scores.
    code = _unpack_rank(top)  # (BLOCK_M, KNN_P)
    id1 = tl.gather(_unpack_rank(best1), code // K_P, 1)  # (BLOCK_M, KNN_P) first-half ids
    id2 = tl.gather(_unpack_rank(best2), code % K_P, 1)  # (BLOCK_M, KNN_P) second-half ids
    slot = id1.to(tl.int64) * n_keys + id2  # (BLOCK_M, KNN_P) int64
    cols = tl.arange(0, KNN_P)  # (KNN_P,)
    out = (rows[:, None] * heads + head) * knn + cols[None, :]  # (BLOCK_M, KNN_P)
    keep = row_ok[:, None] & (cols < knn)[None, :]
    tl.store(scores_ptr + out, _unpack_score(top).to(scores_ptr.dtype.element_ty), mask=keep)
    tl.store(slots_ptr + out, slot, mask=keep)


# Decided by TRITON_INTERPRET when ``triton.jit`` ran above, i.e. when this module was imported.
INTERPRETED = not isinstance(_product_search_kernel, triton.runtime.JITFunction)

# Programs take 16 to 32 queries (16: tl.dot's smallest block side) and 4 or 8 warps; the widest
# int64 tile they sort in registers is at most 4096 keys (16 per thread at 8 warps) or, for a wide
# staircase at 16 queries, 16 x 512 (32 per thread). ptxas spilled registers at 16 x 1024.
_MIN_BLOCK = 16
_MAX_BLOCK_N = 128
_MAX_CANDIDATES_PAD = 512


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Block sizes of one launch (all powers of two)."""

    block_m: int  # queries per program
    block_n: int  # sub-keys scored per step
    block_d: int  # dimensions per tl.dot
    k_pad: int  # >= k' = min(knn, n): the per-half top list
    cand_pad: int  # >= C: the staircase
    knn_pad: int  # >= knn: the final top list
    num_warps: int


def _blocks(n_queries: int, knn: int, n_keys: int, half: int) -> _Blocks:
    """Heuristic block sizes: at most 4096 int64 keys in a tile, or 16 x ``_MAX_CANDIDATES_PAD``.

    128 sub-keys per step (32 queries x 128 keys = 16 keys per thread at 8 warps); fewer queries
    per program when the staircase is wide or the batch is small (more programs to fill the
    GPU). A starting point to tune on an H100/H200, kept deterministic (not autotuned) so that
    two runs sum in the same order.
    """
    k_pad = _pow2(min(knn, n_keys))
    cand_pad = _candidates_pad(knn, n_keys)
    block_n = max(_MIN_BLOCK, k_pad, min(_MAX_BLOCK_N, _pow2(n_keys)))
    widest = max(block_n, cand_pad)
    block_m = max(_MIN_BLOCK, min(32, _pow2(n_queries), 4096 // widest))
    return _Blocks(
        block_m=block_m,
        block_n=block_n,
        block_d=max(_MIN_BLOCK, min(32, _pow2(half))),
        k_pad=k_pad,
        cand_pad=cand_pad,
        knn_pad=_pow2(knn),
        num_warps=8 if block_m * widest >= 4096 else 4,
    )


def _pow2(x: int) -> int:
    return triton.next_power_of_2(x)


def _candidates_pad(knn: int, n_keys: int) -> int:
    """C_P: the staircase's size, C ~ knn ln(knn), up to a power of two."""
    return _pow2(_staircase(knn, n_keys, torch.device("cpu"))[0].numel())


def fits(knn: int, n_keys: int) -> bool:
    """Whether the kernel holds this search in registers (else ``product_topk`` uses torch)."""
    return _candidates_pad(knn, n_keys) <= _MAX_CANDIDATES_PAD


# The query dtypes the kernel ranks (a layer's kernels="auto" leaves others to the torch path).
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(halves: torch.Tensor) -> torch.dtype:
    """The dtype torch's matmul would score in: autocast's, if on, else the query's (product_topk
    lets the sub-keys' dtype differ from the query's only under autocast, which casts both)."""
    dtype = halves.dtype
    device = halves.device.type
    if dtype in SCORE_DTYPES and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    if dtype not in SCORE_DTYPES:
        raise TypeError(
            f'product_topk(method="triton") ranks float32, bfloat16 or float16 scores, got {dtype}'
            ' (a score and an index share one 64-bit key); use method="fast"'
        )
    return dtype


@functools.lru_cache(maxsize=64)
def _staircase_codes(knn: int, n_keys: int, k_pad: int, device: torch.device) -> torch.Tensor:
    """The staircase's rank pairs as codes r1 * k_pad + r2, int32 (C,), in (r1, r2) order."""
    rank1, rank2 = _staircase(knn, n_keys, device)  # (C,) each, cached
    return (rank1 * k_pad + rank2).to(torch.int32)  # (C,)


def fused_product_topk(
    halves: torch.Tensor, subkeys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` product keys per query and head, best first, from one kernel launch.

    halves: (M, H, 2, half); subkeys: (H, 2, n, half); 1 <= knn <= n^2 and ``fits(knn, n)``.
    Returns scores (M, H, knn) in the scoring dtype (autocast's, if on) and slots (M, H, knn)
    int64, ``i1 * n + i2``; ties as in the module docstring. No autograd.
    """
    n_queries, heads, _, half = halves.shape
    n_keys = subkeys.shape[2]
    dtype = _compute_dtype(halves)
    halves = halves.to(dtype).contiguous()  # (M, H, 2, half); no copy when already so
    subkeys = subkeys.to(dtype).contiguous()  # (H, 2, n, half)
    scores = torch.empty(n_queries, heads, knn, device=halves.device, dtype=dtype)
    slots = torch.empty(n_queries, heads, knn, device=halves.device, dtype=torch.int64)
    if n_queries == 0:
        return scores, slots
    blocks = _blocks(n_queries, knn, n_keys, half)
    codes = _staircase_codes(knn, n_keys, blocks.k_pad, halves.device)  # (C,)
    grid = (triton.cdiv(n_queries, blocks.block_m), heads)
    # Triton launches on the current CUDA device: make it the tensors' one.
    on_device = torch.cuda.device(halves.device) if halves.is_cuda else contextlib.nullcontext()
    with on_device:
        _product_search_kernel[grid](
            halves,
            subkeys,
            codes,
            scores,
            slots,
            n_queries,
            heads,
            n_keys,
            half,
            knn,
            codes.numel(),
            halves.stride(0),
            halves.stride(1),
            halves.stride(2),
            BLOCK_M=blocks.block_m,
            BLOCK_N=blocks.block_n,
            BLOCK_D=blocks.block_d,
            K_P=blocks.k_pad,
            C_P=blocks.cand_pad,
            KNN_P=blocks.knn_pad,
            # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584,
            # "we just don't support it yet"): there, the exact bfloat16 products are taken in fp32.
            DOT_IN_FP32=INTERPRETED,
            num_warps=blocks.num_warps,
        )
    return scores, slots


_SIGNATURE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile_ahead(blocks: _Blocks, dtype: torch.dtype, capability: int = 90):
    """Compile the kernel for an NVIDIA GPU of ``capability`` (90: H100/H200) without one.

    To check that it builds with this Triton and, with TRITON_DUMP_PTXAS_LOG=1, what ptxas
    reports (registers, spills). Only where the kernel is compiled, not interpreted. Returns
    Triton's compiled kernel (``.asm["ptx"]``, ``.metadata``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = f"*{_SIGNATURE_DTYPES[dtype]}"
    constants = {
        "BLOCK_M": blocks.block_m,
        "BLOCK_N": blocks.block_n,
        "BLOCK_D": blocks.block_d,
        "K_P": blocks.k_pad,
        "C_P": blocks.cand_pad,
        "KNN_P": blocks.knn_pad,
        "DOT_IN_FP32": False,
    }
    types = {"q_ptr": values, "c_ptr": values, "scores_ptr": values}
    types |= {"codes_ptr": "*i32", "slots_ptr": "*i64"} | dict.fromkeys(constants, "constexpr")
    # In the kernel's argument order; the sizes and strides are 32-bit integers.
    signature = {name: types.get(name, "i32") for name in _product_search_kernel.arg_names}
    source = ASTSource(fn=_product_search_kernel, signature=signature, constexprs=constants)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": blocks.num_warps})
