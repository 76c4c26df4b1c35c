"""Exact top-k key search: flat keys, and product keys.

Taught in ``notebooks/01_flat_key_memory.ipynb`` (flat), ``notebooks/02_product_keys.ipynb``
(product keys, the staircase) and ``notebooks/06_complexity_and_speed.ipynb`` (the fast path).

Both functions return the exact top-``knn`` keys by inner product with the query, sorted by
descending score, as ``(scores, indices)`` with int64 indices and scores that stay differentiable
with respect to the query and the keys.

Flat keys score every key: O(N * d) per query. Product keys (Lample et al. 2019) split
the query ``q = [q1, q2]`` and score each half against its own set of ``n`` sub-keys; the key
``(i1, i2)`` is the concatenation ``[c1[i1], c2[i2]]``, so its score is the sum

    <q, [c1[i1], c2[i2]]> = <q1, c1[i1]> + <q2, c2[i2]>.

The top-k of a sum of two independent terms lies inside top-k(first) x top-k(second): if i1 is not
in the first half's top-k, k other sub-keys beat it with the same i2, so (i1, i2) cannot be in the
final top-k. Searching the k*k candidate sums is therefore exact, and costs
O((sqrt(N) + k^2) * d) instead of O(N * d); the N = n^2 full keys are never made.

The same argument prunes further: both per-half lists are sorted, so only the ~k*ln(k) candidates
of a staircase can win (``staircase``). ``product_topk``'s default fast path searches only those,
builds slot ids for the winners alone, works through the queries in cache-sized blocks, and takes
each long top-k in two short passes (ranking integer keys on CPU). ``method="reference"`` keeps the
readable k*k search; the tests check that both agree. The speed-up is measured in
``notebooks/06_complexity_and_speed.ipynb`` and by ``python -m pkm_ref bench``.

``method="triton"`` runs the fast path's steps fused in one GPU kernel (``pkm_ref.search_triton``,
imported only then): the sub-key scores, both per-half top-k's and the staircase stay in
registers, and only the winners' slot ids and scores are written. It needs CUDA tensors (or
Triton's CPU interpreter, for tests) and float32/bfloat16/float16 scores; its gradients come from
recomputing the winners' scores in torch, as ``flat_topk``'s do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pkm_ref import _checks, _triton

# The flat search scores queries against at most this many (query, key) pairs at a time, so the
# (queries x N) score matrix is never materialised. CPU: 2^24 float32 scores = 64 MiB. GPU: 2^27
# (512 MiB), so that each block is a large matmul rather than thousands of kernel launches.
_FLAT_BLOCK_ELEMENTS = {"cpu": 1 << 24, "other": 1 << 27}

PRODUCT_METHODS = ("fast", "reference", "triton")
_TRITON_CALLER = 'product_topk(method="triton")'

# Candidates per row above this overflowed int32 indexing in a CUDA top-k of one public port.
_MAX_CANDIDATES = 2**31 - 1

# The fast search takes the queries in blocks of at most this many half scores (M_block, H, 2, n).
# CPU: 2^22 float32 (16 MiB). Temporaries of this size are reused by the allocator, larger ones are
# mapped afresh and page-faulted on every call (which cost as much as the arithmetic); smaller
# blocks mean more, shorter kernels. GPU: a block is most of the batch.
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 27}


def flat_topk(
    query: torch.Tensor, keys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``knn`` of ``query @ keys.T``, sorted by descending score.

    Single head: ``query`` (..., d), ``keys`` (N, d). Multi-head: ``query`` (..., H, d),
    ``keys`` (H, N, d), each head searching its own keys.

    The search runs block-wise over the keys (at most ~2^24 scores in memory at a time) without
    gradient tracking; when autograd needs them, the selected scores are recomputed from the
    selected keys, so they are differentiable with respect to ``query`` and ``keys`` at a cost of
    O(knn * d) per query.

    Returns:
        scores: (..., knn) or (..., H, knn), same dtype as ``query``, descending.
        indices: (..., knn) or (..., H, knn), int64 in [0, N).
    """
    _checks.floating("query", _checks.tensor("query", query))
    _checks.same_dtype("keys", _checks.tensor("keys", keys), "query", query)
    if keys.dim() not in (2, 3):
        raise ValueError(f"keys must have shape (N, d) or (H, N, d), got {tuple(keys.shape)}")
    single_head = keys.dim() == 2
    given_shape = tuple(query.shape)
    if single_head:
        keys = keys.unsqueeze(0)  # (1, N, d)
        query = query.unsqueeze(-2)  # (..., 1, d)
    heads, n_slots, dim = keys.shape
    if query.dim() < 2 or query.shape[-2:] != (heads, dim):
        expected = f"(..., {dim})" if single_head else f"(..., {heads}, {dim})"
        raise ValueError(f"query must have shape {expected} to match keys, got {given_shape}")
    knn = _checks.knn_within(knn, n_slots, "the number of keys N")

    lead_shape = query.shape[:-2]
    flat_query = query.reshape(-1, heads, dim)  # (M, H, d)
    with torch.no_grad():
        scores, indices = _blockwise_topk(flat_query, keys, knn)  # (M, H, knn) each
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad):
        # Recompute the chosen scores with autograd: <q, keys[h, idx]>, O(knn * d) per query.
        chosen_keys = _gather_rows(keys, indices)  # (M, H, knn, d)
        scores = torch.einsum("mhd,mhkd->mhk", flat_query, chosen_keys)  # (M, H, knn)
        scores, indices = _sorted_by_score(scores, indices)  # (M, H, knn) each

    out_shape = lead_shape + ((knn,) if single_head else (heads, knn))
    return scores.reshape(out_shape), indices.reshape(out_shape)


def _gather_rows(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``table[g, indices[m, g, k]]`` of a grouped table, differentiably.

    table: (G, N, d); indices: (M, G, K) int64 in [0, N). Returns (M, G, K, d).
    Read as rows of the (G * N, d) table with F.embedding: its backward sums the gradients of a
    row in a fixed order, where ``table[g, indices]`` accumulates them in a different order on
    every multi-threaded run, so training could not be repeated bit for bit.
    """
    groups, n_rows, dim = table.shape
    offsets = torch.arange(groups, device=table.device)[:, None] * n_rows  # (G, 1)
    return F.embedding(indices + offsets, table.reshape(groups * n_rows, dim))  # (M, G, K, d)


def _sorted_by_score(
    scores: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputed scores can reorder near-ties by rounding: sort again, descending, so that the
    contract holds (stable: equal scores keep the search's order). (..., K) each."""
    scores, order = scores.sort(dim=-1, descending=True, stable=True)  # (..., K)
    return scores, indices.gather(-1, order)  # (..., K) each


def _blockwise_topk(
    query: torch.Tensor, keys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` (scores, indices) per (query, head), scanning the keys in blocks.

    query: (M, H, d); keys: (H, N, d). Returns two (M, H, knn) tensors, sorted by descending score.
    """
    n_queries, heads, _ = query.shape
    n_slots = keys.shape[1]
    budget = _FLAT_BLOCK_ELEMENTS["cpu" if query.device.type == "cpu" else "other"]
    block = max(knn, budget // max(1, n_queries * heads))
    best_scores = best_indices = None
    for start in range(0, n_slots, block):
        stop = min(start + block, n_slots)
        scores = torch.einsum("mhd,hnd->mhn", query, keys[:, start:stop])  # (M, H, B)
        top_scores, top_idx = scores.topk(min(knn, stop - start), dim=-1)  # (M, H, <=knn)
        top_idx = top_idx + start
        if best_scores is not None:
            # Merge the running best with this block's best: still exact, 2*knn per row.
            top_scores = torch.cat([best_scores, top_scores], dim=-1)  # (M, H, <=2knn)
            top_idx = torch.cat([best_indices, top_idx], dim=-1)
            top_scores, pos = top_scores.topk(min(knn, top_scores.shape[-1]), dim=-1)
            top_idx = top_idx.gather(-1, pos)
        best_scores, best_indices = top_scores, top_idx
    return best_scores, best_indices


def product_topk(
    query: torch.Tensor, subkeys: torch.Tensor, knn: int, method: str = "fast"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``knn`` over the n^2 product keys, sorted by descending score.

    Single head: ``query`` (..., k_dim), ``subkeys`` (2, n, k_dim // 2).
    Multi-head: ``query`` (..., H, k_dim), ``subkeys`` (H, 2, n, k_dim // 2).

    Slot ``i1 * n + i2`` is the key ``[subkeys[0, i1], subkeys[1, i2]]``; its score is
    ``<q[:k_dim/2], subkeys[0, i1]> + <q[k_dim/2:], subkeys[1, i2]>``.

    ``method="reference"`` is the straightforward search taught in notebook 02: all k*k candidate
    sums. ``method="fast"`` (the default, used by the memory layers) returns the same result from
    the ~knn*ln(knn) candidates of the staircase (``staircase``), in cache-sized blocks of queries
    and with the cheapest exact top-k of the device. ``method="triton"`` returns it from one fused
    GPU kernel (``pkm_ref.search_triton``: CUDA tensors, or CPU ones under TRITON_INTERPRET=1;
    float32, bfloat16 or float16), equal scores ordered by the sub-keys' ranks; a knn whose
    staircase exceeds the kernel's registers (knn > 105 when n >= knn) is searched by the fast path.

    Returns:
        scores: (..., knn) or (..., H, knn), same dtype as ``query``, descending, differentiable
            with respect to ``query`` and ``subkeys``.
        indices: (..., knn) or (..., H, knn), int64 slot indices in [0, n^2).
    """
    _checks.floating("query", _checks.tensor("query", query))
    _checks.same_dtype("subkeys", _checks.tensor("subkeys", subkeys), "query", query)
    _checks.one_of("method", method, PRODUCT_METHODS)
    if subkeys.dim() not in (3, 4) or subkeys.shape[-3] != 2:
        raise ValueError(
            "subkeys must have shape (2, n_keys, k_dim // 2) or (H, 2, n_keys, k_dim // 2), "
            f"got {tuple(subkeys.shape)}"
        )
    single_head = subkeys.dim() == 3
    given_shape = tuple(query.shape)
    if single_head:
        subkeys = subkeys.unsqueeze(0)  # (1, 2, n, half)
        query = query.unsqueeze(-2)  # (..., 1, k_dim)
    heads, _, n_keys, half = subkeys.shape
    if query.dim() < 2 or query.shape[-2:] != (heads, 2 * half):
        expected = f"(..., {2 * half})" if single_head else f"(..., {heads}, {2 * half})"
        raise ValueError(f"query must have shape {expected} to match subkeys, got {given_shape}")
    knn = _checks.knn_within(knn, n_keys * n_keys, "the number of product keys n_keys**2")

    lead_shape = query.shape[:-2]
    halves = query.reshape(-1, heads, 2, half)  # (M, H, 2, half)
    search = {
        "fast": _product_topk_fast,
        "reference": _product_topk_reference,
        "triton": _product_topk_triton,
    }[method]
    scores, indices = search(halves, subkeys, knn)  # (M, H, knn) each

    out_shape = lead_shape + ((knn,) if single_head else (heads, knn))
    return scores.reshape(out_shape), indices.reshape(out_shape)


def _product_topk_reference(
    halves: torch.Tensor, subkeys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward search: every one of the k*k candidate sums.

    halves: (M, H, 2, half); subkeys: (H, 2, n, half). Returns two (M, H, knn) tensors.
    """
    n_keys = subkeys.shape[2]
    k_half = min(knn, n_keys)  # with knn > n every sub-key is a candidate
    _check_candidates(k_half * k_half, knn)
    # Score each query half against its own sub-keys: 2 * n dot products of size d/2.
    half_scores = torch.einsum("mhtd,htnd->mhtn", halves, subkeys)  # (M, H, 2, n)
    top_scores, top_idx = half_scores.topk(k_half, dim=-1)  # (M, H, 2, k')
    scores1, scores2 = top_scores.unbind(dim=2)  # (M, H, k') each
    idx1, idx2 = top_idx.unbind(dim=2)  # (M, H, k') each
    # All k' x k' sums of one first-half and one second-half candidate.
    cand_scores = scores1.unsqueeze(-1) + scores2.unsqueeze(-2)  # (M, H, k', k')
    cand_slots = idx1.unsqueeze(-1) * n_keys + idx2.unsqueeze(-2)  # (M, H, k', k') int64
    scores, pos = cand_scores.flatten(-2).topk(knn, dim=-1)  # (M, H, knn), sorted
    indices = cand_slots.flatten(-2).gather(-1, pos)  # (M, H, knn)
    return scores, indices


# --- The fast exact path ------------------------------------------------------------------------


def staircase(knn: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned candidate set: 0-based rank pairs (r1, r2) with (r1 + 1) * (r2 + 1) <= knn.

    Both halves' top-k lists are sorted, so the candidate at 1-based ranks (i, j) is beaten or tied
    by the i * j candidates at ranks (i' <= i, j' <= j). When i * j > knn, at least knn others beat
    it and it can never be in the top knn. The survivors form a staircase under the hyperbola
    i * j = knn: sum_i floor(knn / i) ~ knn * ln(knn) pairs (119 instead of 1024 at knn = 32).
    Ranks stop at min(knn, n_keys).

    Returns:
        two int64 tensors (C,): the rank in the first half's and in the second half's top list.
    """
    n_keys = _checks.positive_int("n_keys", n_keys)
    knn = _checks.knn_within(knn, n_keys * n_keys, "the number of product keys n_keys**2")
    return _staircase(knn, n_keys, torch.device("cpu"))


# Staircases by (knn, n_keys, device): a plain dict, read by torch.compile as the tensors it holds.
_STAIRCASES: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _staircase(knn: int, n_keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``staircase`` cached per (knn, n_keys, device), built from Python ints in O(C), no k*k mask.

    Neither an ``lru_cache`` (torch.compile skips the cache, with a warning) nor torch ops whose
    output sizes depend on data (they broke a compiled layer's graph in six places, rebuilding
    the staircase on every call): a compiled layer reads the cached tensors, or bakes the ints in.
    """
    key = (knn, n_keys, torch.device(device))
    if key not in _STAIRCASES:
        _STAIRCASES[key] = _build_staircase(knn, n_keys, key[2])
    return _STAIRCASES[key]


def _build_staircase(
    knn: int, n_keys: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Partners of each 0-based first-half rank r1 < k': second-half ranks r2 < knn // (r1 + 1).
    row_lengths = [min(n_keys, knn // (rank + 1)) for rank in range(min(knn, n_keys))]
    _check_candidates(sum(row_lengths), knn)
    rank1 = [rank for rank, length in enumerate(row_lengths) for _ in range(length)]  # C ints
    rank2 = [partner for length in row_lengths for partner in range(length)]  # C ints
    with torch.inference_mode(False):  # cached tensors must also serve later autograd calls
        return torch.tensor(rank1, device=device), torch.tensor(rank2, device=device)  # (C,) each


def _check_candidates(count: int, knn: int) -> None:
    if count > _MAX_CANDIDATES:
        raise ValueError(
            f"knn={knn} needs {count} candidates per query and head, more than top-k kernels "
            f"index safely ({_MAX_CANDIDATES}); use a smaller knn"
        )


def _product_topk_fast(
    halves: torch.Tensor, subkeys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_product_topk_reference``'s result from the staircase of candidates.

    halves: (M, H, 2, half); subkeys: (H, 2, n, half). Returns two (M, H, knn) tensors.
    Ranks are chosen without autograd; scores are gathered from the differentiable half scores,
    so gradients reach the query and the selected sub-keys exactly as in the reference.
    """
    heads, _, n_keys, _ = subkeys.shape
    k_half = min(knn, n_keys)
    # The per-half top-k', in blocks of queries (see _BLOCK_ELEMENTS).
    budget = _BLOCK_ELEMENTS["cpu" if halves.device.type == "cpu" else "other"]
    blocks = halves.split(max(1, budget // (heads * 2 * n_keys)))
    top_scores, top_idx = _cat_pairs([_half_topk(block, subkeys, k_half) for block in blocks])
    # The staircase candidates s1[r1] + s2[r2], never the k' x k' grid.
    rank1, rank2 = _staircase(knn, n_keys, halves.device)  # (C,) each
    # gather with a broadcast index: on CPU about 3x faster than index_select along the last dim.
    shape = (*top_scores.shape[:2], rank1.numel())  # (M, H, C)
    cand_scores = (
        top_scores[:, :, 0].gather(-1, rank1.expand(shape))  # (M, H, C)
        + top_scores[:, :, 1].gather(-1, rank2.expand(shape))  # (M, H, C)
    )
    pos = _topk_indices(cand_scores.detach(), knn)  # (M, H, knn), best first
    scores = cand_scores.gather(-1, pos)  # (M, H, knn)
    # Slot ids for the winners only: first-half sub-key * n + second-half sub-key.
    idx1 = top_idx[:, :, 0].gather(-1, rank1[pos])  # (M, H, knn)
    idx2 = top_idx[:, :, 1].gather(-1, rank2[pos])  # (M, H, knn)
    return scores, idx1 * n_keys + idx2


def _half_topk(
    halves: torch.Tensor, subkeys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and sub-key ids of each query half, best first: (B, H, 2, k) each.

    The half scores are laid out (H, 2, B, n), as the batched matmul writes them, so top-k reads
    contiguous rows; only the short (.., k) results are permuted back, not the (.., n) scores.
    """
    half_scores = torch.matmul(halves.permute(1, 2, 0, 3), subkeys.mT)  # (H, 2, B, n)
    top_idx = _topk_indices(half_scores.detach(), k)  # (H, 2, B, k)
    top_scores = half_scores.gather(-1, top_idx)  # (H, 2, B, k)
    return top_scores.permute(2, 0, 1, 3), top_idx.permute(2, 0, 1, 3)  # (B, H, 2, k) each


def _cat_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate a list of (a, b) pairs into (cat(a's), cat(b's)) along dim 0."""
    if len(pairs) == 1:
        return pairs[0]
    first, second = zip(*pairs, strict=True)
    return torch.cat(first), torch.cat(second)


def _topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` along the last dim, largest first. No autograd.

    Two exact savings over one ``torch.topk``: long rows take a two-stage select
    (``_chunked_topk``), on every device; and on CPU, where ``topk`` runs a comparison select per
    row at a few ns per entry, integer keys are ranked instead of floats (``_int_topk``). On GPU
    ``topk`` is a radix select on the float bits already, so the floats are ranked directly
    (``_float_topk``, which sorts short 16-bit rows instead).
    """
    select = _int_topk if scores.device.type == "cpu" else _float_topk
    chunk = _chunk_length(scores.shape[-1], k)
    if chunk == 1:
        return select(scores, k)
    return _chunked_topk(scores, k, chunk, select)


# On GPU, rows of at most this many 16-bit floats are ranked by a full sort (see _float_topk).
_GPU_SORT_MAX_LENGTH = 128


def _float_topk(scores: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    """``scores.topk(k).indices`` on the floats themselves: the GPU's one-pass select.

    ``topk`` is a radix select, one thread block per row. Short rows of 16-bit floats (bfloat16
    under autocast) are ranked faster by sorting them whole, in registers: on an H200, 131,072
    bfloat16 rows of 128 took 0.53 ms to sort against 0.94 ms for ``topk``. For float32 rows,
    and rows longer than ``_GPU_SORT_MAX_LENGTH``, ``topk`` was as fast or faster.
    """
    if scores.element_size() == 2 and scores.shape[-1] <= _GPU_SORT_MAX_LENGTH:
        return scores.sort(dim=-1, descending=True).indices[..., :k]  # (..., k), best first
    return scores.topk(k, dim=-1, sorted=sorted).indices  # (..., k)


def _int_topk(scores: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    """``scores.topk(k).indices``, ranked on integer keys: ~1.5x faster on CPU than on floats.

    A float's bits read as a signed integer already order the non-negative floats; flipping every
    bit but the sign of the negative ones reverses their order, which puts them in place too
    (-0.0 lands just below +0.0). The float compare of ``topk`` also checks for NaN, hence the cost.
    """
    bits = scores.view(_INT_OF_WIDTH[scores.element_size()])  # (..., n) same width
    keys = bits ^ ((bits >> (8 * scores.element_size() - 1)) & torch.iinfo(bits.dtype).max)
    return keys.topk(k, dim=-1, sorted=sorted).indices  # (..., k)


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _chunked_topk(
    scores: torch.Tensor, k: int, chunk: int, select: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """Exact top-k indices in two short passes: the best chunks, then the best of their members.

    Cut each row of n entries into n / L chunks of L = ``chunk`` entries (chunk j holds entries
    j, j + n/L, j + 2n/L, ...: strided, so the max over each chunk is a fast max of L contiguous
    vectors). A chunk whose maximum is not among the k largest chunk maxima is beaten by k entries
    of other chunks (those maxima), so none of its entries is in the top k: the product-key
    argument once more. Top-k then scans n / L + k * L entries instead of n. ``select(x, k,
    sorted=...)`` is the one-pass top-k of the device (``_int_topk`` or ``_float_topk``).
    """
    *lead, n = scores.shape
    n_chunks = n // chunk
    strided = scores.unflatten(-1, (chunk, n_chunks))  # (..., L, n/L): chunk j = column j
    best = select(strided.amax(-2), k, sorted=False)  # (..., k) chunk ids
    members = strided.gather(-1, best.unsqueeze(-2).expand(*lead, chunk, k))  # (..., L, k)
    pos = select(members.flatten(-2), k)  # (..., k) into the L * k members, best first
    return best.gather(-1, pos % k) + (pos // k) * n_chunks  # (..., k) entries of the row


def _chunk_length(n: int, k: int) -> int:
    """Chunk length L for ``_chunked_topk``, or 1 when a single top-k over n is cheaper.

    The two passes scan n / L + k * L entries (least near L = sqrt(n / k)); they pay for their
    extra kernels when that is at most half of n. L divides n and leaves at least k chunks.
    """
    lengths = [L for L in (2, 4, 8, 16, 32, 64) if n % L == 0 and n // L >= k]
    if not lengths:
        return 1
    best = min(lengths, key=lambda L: n // L + k * L)
    return best if n // best + k * best <= n // 2 else 1


# --- The fused Triton kernel ---------------------------------------------------------------------


def _product_topk_triton(
    halves: torch.Tensor, subkeys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_product_topk_reference``'s result from one fused Triton kernel (``search_triton``).

    halves: (M, H, 2, half); subkeys: (H, 2, n, half). Returns two (M, H, knn) tensors.
    The kernel ranks without autograd and writes only the winners' slot ids and scores; when
    autograd needs the scores, they are recomputed from the winners' sub-keys in O(knn * d)
    (``_rescore_product``). A knn whose staircase would not fit in registers takes the fast torch
    path instead (``search_triton.fits``): the same exact result, at that path's speed.
    """
    kernels = _triton.import_kernels("search_triton", _TRITON_CALLER, 'method="fast"')
    _triton.check_runnable(halves.device, kernels.INTERPRETED, _TRITON_CALLER, 'method="fast"')
    with torch.no_grad():
        if kernels.fits(knn, subkeys.shape[2]):
            scores, slots = kernels.fused_product_topk(halves, subkeys, knn)  # (M, H, knn) each
        else:
            scores, slots = _product_topk_fast(halves, subkeys, knn)  # (M, H, knn) each
    if torch.is_grad_enabled() and (halves.requires_grad or subkeys.requires_grad):
        scores, slots = _rescore_product(halves, subkeys, slots)  # (M, H, knn) each
    return scores, slots


def _rescore_product(
    halves: torch.Tensor, subkeys: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen slots' scores recomputed with autograd, O(knn * d), then sorted again.

    halves: (M, H, 2, half); subkeys: (H, 2, n, half); slots: (M, H, knn) int64.
    Each half is scored and rounded on its own and the two added, as the other paths do, so the
    scores have the same rounding as theirs; gradients reach the query and only the chosen
    sub-keys, in a fixed order (``_gather_rows``).
    """
    heads, _, n_keys, half = subkeys.shape
    sub_ids = torch.stack([slots // n_keys, slots % n_keys], dim=2)  # (M, H, 2, knn)
    chosen = _gather_rows(
        subkeys.reshape(heads * 2, n_keys, half), sub_ids.flatten(1, 2)
    )  # (M, 2H, knn, half)
    half_scores = torch.einsum("mgd,mgkd->mgk", halves.flatten(1, 2), chosen)  # (M, 2H, knn)
    half_scores = half_scores.unflatten(1, (heads, 2))  # (M, H, 2, knn)
    scores = half_scores[:, :, 0] + half_scores[:, :, 1]  # (M, H, knn)
    return _sorted_by_score(scores, slots)
