"""Exact top-k key search: flat keys, and product keys.

Taught in ``notebooks/01_flat_key_memory.ipynb`` (flat) and ``notebooks/02_product_keys.ipynb``
(product keys).

Both functions return the exact top-``knn`` keys by inner product with the query, sorted by
descending score, as ``(scores, indices)`` with int64 indices and scores that stay differentiable
with respect to the query and the keys.

Flat keys score every key: O(N * d) per query. Product keys (Lample et al. 2019, section 3.2) split
the query ``q = [q1, q2]`` and score each half against its own set of ``n`` sub-keys; the key
``(i1, i2)`` is the concatenation ``[c1[i1], c2[i2]]``, so its score is the sum

    <q, [c1[i1], c2[i2]]> = <q1, c1[i1]> + <q2, c2[i2]>.

The top-k of a sum of two independent terms lies inside top-k(first) x top-k(second): if i1 is not
in the first half's top-k, k other sub-keys beat it with the same i2, so (i1, i2) cannot be in the
final top-k. Searching the k*k candidate sums is therefore exact, and costs
O((sqrt(N) + k^2) * d) instead of O(N * d); the N = n^2 full keys are never made.
"""

from __future__ import annotations

import torch

from pkm_ref import _checks

# The flat search scores queries against at most this many (query, key) pairs at a time, so the
# (queries x N) score matrix is never materialised: 2^24 float32 scores = 64 MiB.
_FLAT_BLOCK_ELEMENTS = 1 << 24


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
    _checks.tensor("keys", keys)
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
    _checks.knn_within(knn, n_slots, "the number of keys N")

    lead_shape = query.shape[:-2]
    flat_query = query.reshape(-1, heads, dim)  # (M, H, d)
    with torch.no_grad():
        scores, indices = _blockwise_topk(flat_query, keys, knn)  # (M, H, knn) each
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad):
        # Recompute the chosen scores with autograd: <q, keys[h, idx]>, O(knn * d) per query.
        head = torch.arange(heads, device=keys.device)[:, None]  # (H, 1)
        chosen_keys = keys[head, indices]  # (M, H, knn, d)
        scores = torch.einsum("mhd,mhkd->mhk", flat_query, chosen_keys)  # (M, H, knn)
        # Recomputation can reorder near-ties by rounding; sort again so the contract holds.
        scores, order = scores.sort(dim=-1, descending=True)  # (M, H, knn)
        indices = indices.gather(-1, order)  # (M, H, knn)

    out_shape = lead_shape + ((knn,) if single_head else (heads, knn))
    return scores.reshape(out_shape), indices.reshape(out_shape)


def _blockwise_topk(
    query: torch.Tensor, keys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` (scores, indices) per (query, head), scanning the keys in blocks.

    query: (M, H, d); keys: (H, N, d). Returns two (M, H, knn) tensors, sorted by descending score.
    """
    n_queries, heads, _ = query.shape
    n_slots = keys.shape[1]
    block = max(knn, _FLAT_BLOCK_ELEMENTS // max(1, n_queries * heads))
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
    query: torch.Tensor, subkeys: torch.Tensor, knn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``knn`` over the n^2 product keys, sorted by descending score.

    Single head: ``query`` (..., k_dim), ``subkeys`` (2, n, k_dim // 2).
    Multi-head: ``query`` (..., H, k_dim), ``subkeys`` (H, 2, n, k_dim // 2).

    Slot ``i1 * n + i2`` is the key ``[subkeys[0, i1], subkeys[1, i2]]``; its score is
    ``<q[:k_dim/2], subkeys[0, i1]> + <q[k_dim/2:], subkeys[1, i2]>``.

    Returns:
        scores: (..., knn) or (..., H, knn), same dtype as ``query``, descending, differentiable
            with respect to ``query`` and ``subkeys``.
        indices: (..., knn) or (..., H, knn), int64 slot indices in [0, n^2).
    """
    _checks.floating("query", _checks.tensor("query", query))
    _checks.tensor("subkeys", subkeys)
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
    _checks.knn_within(knn, n_keys * n_keys, "the number of product keys n_keys**2")

    lead_shape = query.shape[:-2]
    halves = query.reshape(-1, heads, 2, half)  # (M, H, 2, half)
    # Score each query half against its own sub-keys: 2 * n dot products of size d/2.
    half_scores = torch.einsum("mhtd,htnd->mhtn", halves, subkeys)  # (M, H, 2, n)
    # Top-k per half; with knn > n every sub-key is a candidate.
    k_half = min(knn, n_keys)
    top_scores, top_idx = half_scores.topk(k_half, dim=-1)  # (M, H, 2, k')
    scores1, scores2 = top_scores.unbind(dim=2)  # (M, H, k') each
    idx1, idx2 = top_idx.unbind(dim=2)  # (M, H, k') each
    # All k' x k' sums of one first-half and one second-half candidate.
    cand_scores = scores1.unsqueeze(-1) + scores2.unsqueeze(-2)  # (M, H, k', k')
    cand_slots = idx1.unsqueeze(-1) * n_keys + idx2.unsqueeze(-2)  # (M, H, k', k') int64
    scores, pos = cand_scores.flatten(-2).topk(knn, dim=-1)  # (M, H, knn), sorted
    indices = cand_slots.flatten(-2).gather(-1, pos)  # (M, H, knn)

    out_shape = lead_shape + ((knn,) if single_head else (heads, knn))
    return scores.reshape(out_shape), indices.reshape(out_shape)
