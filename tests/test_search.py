"""product_topk and flat_topk are exact: they equal brute force over the materialised keys."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import materialise_product_keys
from pkm_ref import flat_topk, product_topk, search


def brute_force(query: torch.Tensor, keys: torch.Tensor, knn: int):
    """Full sort of all scores. query (..., H, d), keys (H, N, d) -> (..., H, knn)."""
    scores = torch.einsum("...hd,hnd->...hn", query, keys)
    return scores.sort(dim=-1, descending=True, stable=True)[0][..., :knn], scores


def assert_exact(scores, indices, query, keys, knn):
    """Returned scores are the true top-knn values, sorted, and belong to the returned indices."""
    best, all_scores = brute_force(query, keys, knn)
    assert indices.dtype == torch.int64
    assert scores.shape == indices.shape == best.shape
    torch.testing.assert_close(scores, best, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_scores.gather(-1, indices), scores, rtol=1e-5, atol=1e-5)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores must be sorted descending"
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "indices must be distinct"


def test_product_topk_single_head_matches_brute_force(device):
    torch.manual_seed(0)
    query = torch.randn(7, 5, 32, device=device)  # (B, T, k_dim)
    subkeys = torch.randn(2, 16, 16, device=device)  # (2, n, k_dim/2)
    scores, indices = product_topk(query, subkeys, knn=8)
    assert scores.shape == (7, 5, 8)
    keys = materialise_product_keys(subkeys.unsqueeze(0))  # (1, 256, 32)
    assert_exact(scores.unsqueeze(-2), indices.unsqueeze(-2), query.unsqueeze(-2), keys, 8)
    # Exactly the brute-force indices (random floats: no ties).
    brute = (query @ keys[0].T).topk(8, dim=-1).indices  # (7, 5, 8)
    assert torch.equal(indices, brute)


def test_product_topk_multi_head_matches_brute_force(device):
    torch.manual_seed(1)
    query = torch.randn(64, 4, 16, device=device)  # (N, H, k_dim)
    subkeys = torch.randn(4, 2, 12, 8, device=device)  # (H, 2, n, k_dim/2)
    scores, indices = product_topk(query, subkeys, knn=20)
    assert_exact(scores, indices, query, materialise_product_keys(subkeys), 20)


def test_slot_index_is_first_half_major(device):
    """Slot i1 * n + i2: i1 indexes the first half's sub-key."""
    subkeys = torch.zeros(2, 5, 1, device=device)
    subkeys[0, 3, 0] = 1.0  # first half prefers sub-key 3
    subkeys[1, 1, 0] = 1.0  # second half prefers sub-key 1
    _, indices = product_topk(torch.ones(2, device=device), subkeys, knn=1)
    assert indices.tolist() == [3 * 5 + 1]


@settings(max_examples=60, deadline=None)
@given(
    n_keys=st.integers(1, 9),
    half=st.integers(1, 6),
    heads=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    knn_fraction=st.floats(0.0, 1.0),
    shift=st.floats(-5.0, 0.0),
    seed=st.integers(0, 2**16),
)
def test_product_topk_hypothesis(n_keys, half, heads, lead, knn_fraction, shift, seed):
    """Any shape, knn from 1 to n_keys**2 (so knn = n_keys too), negative scores."""
    generator = torch.Generator().manual_seed(seed)
    knn = max(1, round(knn_fraction * n_keys * n_keys))
    query = torch.randn(*lead, heads, 2 * half, generator=generator, dtype=torch.float64)
    subkeys = torch.randn(heads, 2, n_keys, half, generator=generator, dtype=torch.float64) + shift
    scores, indices = product_topk(query, subkeys, knn)
    assert scores.shape == (*lead, heads, knn)
    assert_exact(scores, indices, query, materialise_product_keys(subkeys), knn)


@pytest.mark.parametrize("knn", [1, 16])
def test_product_topk_knn_one_and_n_keys(knn, device):
    torch.manual_seed(2)
    query = torch.randn(10, 2, 8, device=device)
    subkeys = torch.randn(2, 2, 16, 4, device=device) - 3.0  # mostly negative scores
    scores, indices = product_topk(query, subkeys, knn)
    assert_exact(scores, indices, query, materialise_product_keys(subkeys), knn)


def test_product_topk_gradients_reach_query_and_selected_subkeys():
    torch.manual_seed(3)
    query = torch.randn(3, 8, requires_grad=True)
    subkeys = torch.randn(2, 10, 4, requires_grad=True)
    scores, indices = product_topk(query, subkeys, knn=2)
    scores.sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    touched = subkeys.grad.abs().sum(-1) > 0  # (2, n)
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[0, indices // 10] = True
    expected[1, indices % 10] = True
    assert torch.equal(touched, expected), "only the selected sub-keys get a gradient"


def test_product_topk_gradcheck():
    torch.manual_seed(4)
    query = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    subkeys = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: product_topk(q, k, 4)[0], (query, subkeys))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    dim=st.integers(1, 8),
    heads=st.integers(1, 3),
    rows=st.integers(1, 20),
    knn_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_flat_topk_matches_full_sort(n, dim, heads, rows, knn_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    knn = max(1, round(knn_fraction * n))
    query = torch.randn(rows, heads, dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(heads, n, dim, generator=generator, dtype=torch.float64)
    scores, indices = flat_topk(query, keys, knn)
    assert_exact(scores, indices, query, keys, knn)


def test_flat_topk_blockwise_is_exact(monkeypatch, device):
    """Force tiny blocks so the running merge across many blocks is exercised."""
    monkeypatch.setitem(search._FLAT_BLOCK_ELEMENTS, "cpu", 64)
    monkeypatch.setitem(search._FLAT_BLOCK_ELEMENTS, "other", 64)
    torch.manual_seed(5)
    query = torch.randn(9, 16, device=device)  # (M, d)
    keys = torch.randn(1000, 16, device=device)  # (N, d)
    scores, indices = flat_topk(query, keys, knn=7)
    assert torch.equal(indices, (query @ keys.T).topk(7, dim=-1).indices)
    torch.testing.assert_close(scores, (query @ keys.T).topk(7, dim=-1).values)


def test_flat_topk_scores_differentiable():
    torch.manual_seed(6)
    query = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: flat_topk(q, k, 3)[0], (query, keys))


def test_flat_topk_key_gradients_repeat_bit_for_bit():
    """Training with flat keys must repeat exactly (a resumed run continues the same run): the
    gradient of a key read by many queries is summed in the same order on every run, on two
    threads as on one. Advanced indexing summed it in a different order each time."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(4, 4096, 64, generator=generator)  # (H, N, d)
    query = torch.randn(4096, 4, 64, generator=generator)  # (M, H, d)

    def key_gradient() -> torch.Tensor:
        leaf = keys.clone().requires_grad_()
        scores, _ = flat_topk(query, leaf, 32)  # (M, H, 32)
        scores.square().sum().backward()
        return leaf.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = [key_gradient() for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])


def test_flat_and_product_agree():
    """A flat search over the materialised product keys finds the same slots."""
    torch.manual_seed(7)
    query = torch.randn(50, 2, 16)
    subkeys = torch.randn(2, 2, 8, 8)
    product = product_topk(query, subkeys, 5)
    flat = flat_topk(query, materialise_product_keys(subkeys), 5)
    assert torch.equal(product[1], flat[1])
    torch.testing.assert_close(product[0], flat[0])
