"""The fast product-key path equals the reference: same slots, same scores, same gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import materialise_product_keys
from pkm_ref import ProductKeyMemory, product_topk, search


def both_methods(query, subkeys, knn):
    """(fast, reference) results of product_topk on the same inputs."""
    return product_topk(query, subkeys, knn), product_topk(query, subkeys, knn, method="reference")


def assert_same(fast, reference):
    (scores, indices), (ref_scores, ref_indices) = fast, reference
    assert indices.dtype == torch.int64
    assert scores.dtype == ref_scores.dtype
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)


def test_staircase_has_119_candidates_at_knn_32():
    rank1, rank2 = search.staircase(32, n_keys=512)
    assert rank1.numel() == rank2.numel() == 119 == sum(32 // i for i in range(1, 33))
    assert rank1.dtype == rank2.dtype == torch.int64


@pytest.mark.parametrize("n_keys", range(1, 7))
def test_staircase_is_every_pair_under_the_hyperbola(n_keys):
    """Exhaustive: exactly the rank pairs with (r1+1)(r2+1) <= knn, never fewer than knn."""
    for knn in range(1, n_keys * n_keys + 1):
        rank1, rank2 = search.staircase(knn, n_keys)
        pairs = set(zip(rank1.tolist(), rank2.tolist(), strict=True))
        k_half = min(knn, n_keys)
        expected = {
            (i, j) for i in range(k_half) for j in range(k_half) if (i + 1) * (j + 1) <= knn
        }
        assert pairs == expected and len(pairs) == rank1.numel() >= knn


def test_fast_equals_reference_at_benchmark_shape():
    """2^20 slots' worth of sub-keys (n = 1024): the two-stage CPU top-k is exercised."""
    torch.manual_seed(0)
    query = torch.randn(64, 4, 128, dtype=torch.float64)  # (N, H, k_dim)
    subkeys = torch.randn(4, 2, 1024, 64, dtype=torch.float64)  # (H, 2, n, k_dim/2)
    assert_same(*both_methods(query, subkeys, 32))


def test_fast_equals_reference_across_query_blocks(monkeypatch, device):
    """Tiny blocks: many blocks of queries, and a ragged last one."""
    monkeypatch.setitem(search._BLOCK_ELEMENTS, "cpu", 100)
    monkeypatch.setitem(search._BLOCK_ELEMENTS, "other", 100)
    torch.manual_seed(1)
    query = torch.randn(3, 7, 2, 16, device=device, dtype=torch.float64)  # (B, T, H, k_dim)
    subkeys = torch.randn(2, 2, 20, 8, device=device, dtype=torch.float64)  # (H, 2, n, k_dim/2)
    assert_same(*both_methods(query, subkeys, 6))


@settings(max_examples=80, deadline=None)
@given(
    n_keys=st.integers(1, 70),
    half=st.integers(1, 5),
    heads=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    knn_fraction=st.floats(0.0, 1.0),
    shift=st.floats(-5.0, 0.0),
    single_head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_equals_reference_hypothesis(
    n_keys, half, heads, lead, knn_fraction, shift, single_head, seed
):
    """knn from 1 to n_keys**2 (so knn = n_keys and knn > n_keys), negative scores, any shape."""
    generator = torch.Generator().manual_seed(seed)
    knn = max(1, min(n_keys * n_keys, round(knn_fraction**3 * n_keys * n_keys)))
    heads_shape = () if single_head else (heads,)
    query = torch.randn(*lead, *heads_shape, 2 * half, generator=generator, dtype=torch.float64)
    subkeys = torch.randn(*heads_shape, 2, n_keys, half, generator=generator, dtype=torch.float64)
    fast, reference = both_methods(query, subkeys + shift, knn)
    assert fast[0].shape == (*lead, *heads_shape, knn)
    assert_same(fast, reference)


@pytest.mark.parametrize("knn", [1, 16, 40, 256])
def test_fast_matches_brute_force_float32(knn, device):
    """knn = 1, = n_keys, > n_keys, = n_keys**2, with mostly negative float32 scores."""
    torch.manual_seed(2)
    query = torch.randn(50, 2, 8, device=device)  # (N, H, k_dim)
    subkeys = torch.randn(2, 2, 16, 4, device=device) - 2.0  # (H, 2, n, k_dim/2)
    scores, indices = product_topk(query, subkeys, knn)
    all_scores = torch.einsum("nhd,hsd->nhs", query, materialise_product_keys(subkeys))
    torch.testing.assert_close(scores, all_scores.topk(knn, dim=-1).values)
    torch.testing.assert_close(all_scores.gather(-1, indices), scores)


@pytest.mark.parametrize("n_keys", [64, 512])
def test_fast_equals_reference_in_bfloat16(n_keys, device):
    """bfloat16 scores, as under autocast, tie often: the same top scores, and every slot chosen
    has the score reported. n = 64 takes one select per half, n = 512 the two-stage one (on GPU
    both sort their short 16-bit rows)."""
    torch.manual_seed(7)
    query = torch.randn(300, 4, 32, device=device, dtype=torch.bfloat16)  # (N, H, k_dim)
    subkeys = torch.randn(4, 2, n_keys, 16, device=device, dtype=torch.bfloat16)
    (scores, indices), (ref_scores, _) = both_methods(query, subkeys, 32)  # (N, H, 32) each
    assert torch.equal(scores, ref_scores)
    half_scores = torch.einsum("nhtd,htsd->nhts", query.unflatten(-1, (2, 16)), subkeys)
    first = half_scores[:, :, 0].gather(-1, indices // n_keys)  # (N, H, 32)
    second = half_scores[:, :, 1].gather(-1, indices % n_keys)  # (N, H, 32)
    assert torch.equal(first + second, scores)


def test_fast_gradients_equal_reference(device):
    torch.manual_seed(3)
    query = torch.randn(40, 3, 12, device=device, dtype=torch.float64)  # (N, H, k_dim)
    subkeys = torch.randn(3, 2, 50, 6, device=device, dtype=torch.float64)  # (H, 2, n, k_dim/2)
    weights = torch.randn(40, 3, 10, device=device, dtype=torch.float64)  # (N, H, knn)
    grads = []
    for method in ("fast", "reference"):
        q, k = query.clone().requires_grad_(), subkeys.clone().requires_grad_()
        scores, _ = product_topk(q, k, 10, method=method)
        (scores * weights).sum().backward()
        grads.append((q.grad, k.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_fast_gradcheck():
    torch.manual_seed(4)
    query = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    subkeys = torch.randn(2, 2, 40, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: product_topk(q, k, 5)[0], (query, subkeys))


def test_fast_path_trains_after_an_inference_mode_call():
    """The cached staircase, first built under inference_mode, still serves autograd."""
    query = torch.randn(5, 8, requires_grad=True)
    subkeys = torch.randn(2, 13, 4, requires_grad=True)
    with torch.inference_mode():
        product_topk(query, subkeys, 7)
    product_topk(query, subkeys, 7)[0].sum().backward()
    assert query.grad is not None and subkeys.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_integer_key_top_k_orders_like_the_floats(dtype):
    """Ranking on the float bits as integers: same values as topk, specials included."""
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.0, -3.0])
    values = torch.cat([special, torch.randn(120)]).to(dtype)[torch.randperm(128)]
    rows = torch.stack([values, -values, values.roll(5)])  # (3, 128)
    for k in (1, 8, 40, 128):
        indices = search._topk_indices(rows, k)  # (3, k)
        assert torch.equal(rows.gather(-1, indices), rows.topk(k, dim=-1).values)


@pytest.mark.parametrize("select", [search._int_topk, search._float_topk])
@pytest.mark.parametrize(("n", "k"), [(1024, 32), (512, 32), (4096, 32), (1000, 7), (96, 3)])
def test_chunked_top_k_is_exact(n, k, select):
    """Both one-pass selects (integer keys on CPU, floats on GPU) inside the two-stage path."""
    torch.manual_seed(5)
    chunk = search._chunk_length(n, k)
    assert chunk > 1, "these sizes take the two-stage path"
    scores = torch.randn(6, 2, n)  # (R, 2, n)
    indices = search._chunked_topk(scores, k, chunk, select)  # (R, 2, k)
    assert torch.equal(indices, scores.topk(k, dim=-1).indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [40, 119, 128, 129, 512])
def test_float_select_is_exact_whether_it_sorts_or_selects(dtype, n):
    """The GPU select sorts short 16-bit rows and runs topk otherwise; both give topk's values,
    best first (run on CPU tensors here; the CUDA tests run the search on GPU)."""
    torch.manual_seed(6)
    rows = torch.randn(9, n).to(dtype)  # (R, n), with ties at 16 bits
    for k in (1, 32):
        indices = search._float_topk(rows, k)  # (R, k)
        assert torch.equal(rows.gather(-1, indices), rows.topk(k, dim=-1).values)


def test_short_rows_take_a_single_top_k():
    assert search._chunk_length(64, 32) == search._chunk_length(256, 32) == 1


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_slot_indices_past_int32(method):
    """n = 50_000 sub-keys per half: 2.5e9 slots, slot ids beyond 2^31 stay exact int64."""
    n_keys = 50_000
    subkeys = torch.zeros(2, n_keys, 1)  # (2, n, 1)
    subkeys[0, n_keys - 1, 0] = 1.0
    subkeys[1, n_keys - 2, 0] = 1.0
    _, indices = product_topk(torch.ones(2), subkeys, knn=1, method=method)
    assert indices.dtype == torch.int64
    assert indices.item() == (n_keys - 1) * n_keys + (n_keys - 2) > 2**31


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_very_large_knn_is_refused(monkeypatch, method):
    """A knn whose candidates per row would overflow top-k indexing fails with a clear message."""
    monkeypatch.setattr(search, "_MAX_CANDIDATES", 50)
    search._STAIRCASES.clear()
    with pytest.raises(ValueError, match="candidates per query"):
        product_topk(torch.randn(3, 4), torch.randn(2, 20, 2), knn=40, method=method)
    search._STAIRCASES.clear()


@pytest.mark.parametrize("method", ["fast", "reference", "triton"])
@pytest.mark.parametrize(
    ("query_shape", "subkeys_shape", "knn", "error"),
    [
        ((3, 8), (2, 5, 4), 26, ValueError),  # knn > n^2
        ((3, 8), (2, 5, 4), 0, ValueError),
        ((3, 6), (2, 5, 4), 2, ValueError),  # query width does not match
        ((3, 8), (3, 5, 4), 2, ValueError),  # not two halves
        ((3, 2, 8), (3, 2, 5, 4), 2, ValueError),  # heads do not match
    ],
)
def test_same_validation_errors(method, query_shape, subkeys_shape, knn, error):
    with pytest.raises(error):
        product_topk(torch.randn(query_shape), torch.randn(subkeys_shape), knn, method=method)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        product_topk(torch.randn(3, 8), torch.randn(2, 5, 4), 2, method="fastest")


def test_memory_layer_uses_the_fast_path(monkeypatch):
    calls = []
    fast = search._product_topk_fast
    monkeypatch.setattr(search, "_product_topk_fast", lambda *a: calls.append(1) or fast(*a))
    memory = ProductKeyMemory(16, 16, n_keys=8, k_dim=8, heads=2, knn=4)
    assert memory(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert calls, "ProductKeyMemory must search with the fast exact path by default"


def test_staircase_size_grows_like_k_log_k():
    for knn in (8, 32, 128, 512):
        size = search.staircase(knn, n_keys=knn)[0].numel()
        assert knn * math.log(knn) <= size <= knn * (math.log(knn) + 1)
