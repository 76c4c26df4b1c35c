"""product_topk(method="triton"): the fused kernel finds the reference's slots, exactly.

Where the kernel runs is fixed per process when ``pkm_ref.search_triton`` is imported: without
CUDA, the root conftest.py sets TRITON_INTERPRET=1 and these tests run it on CPU tensors in
Triton's interpreter (slow: shapes are tiny, and n and knn mostly at most 16); with CUDA they run
the compiled kernel on the GPU. Hence this module's own ``device`` fixture: one device, the one
the kernel runs on in this process.
"""

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import materialise_product_keys
from pkm_ref import product_topk

pytest.importorskip("triton", reason="triton is in the dev extra on Linux only")
search_triton = importlib.import_module("pkm_ref.search_triton")


@pytest.fixture(params=["cuda" if torch.cuda.is_available() else "cpu"])
def device(request) -> torch.device:
    return torch.device(request.param)


def both_methods(query, subkeys, knn):
    """(triton, reference) results of product_topk on the same inputs."""
    return (
        product_topk(query, subkeys, knn, method="triton"),
        product_topk(query, subkeys, knn, method="reference"),
    )


def brute_force_indices(query, subkeys, knn):
    """Top-knn slots over the n^2 materialised keys: (M, H, knn).

    query: (M, H, k_dim); subkeys: (H, 2, n, half)."""
    keys = materialise_product_keys(subkeys)  # (H, n*n, k_dim)
    return torch.einsum("mhd,hsd->mhs", query, keys).topk(knn, dim=-1).indices  # (M, H, knn)


@pytest.mark.parametrize(
    ("lead", "heads", "n_keys", "half", "knn"),
    [
        ((2, 3), None, 13, 4, 7),  # single head, leading dims, n and knn not powers of two
        ((5,), 3, 11, 3, 10),  # several heads
        ((4,), 2, 5, 6, 12),  # knn > n: every sub-key of a half is a candidate
        ((3,), 1, 4, 2, 16),  # knn = n^2: every slot
        ((6,), 2, 9, 5, 1),
    ],
)
def test_same_slots_as_reference_and_brute_force(lead, heads, n_keys, half, knn, device):
    torch.manual_seed(0)
    heads_shape = () if heads is None else (heads,)
    query = torch.randn(*lead, *heads_shape, 2 * half, device=device)
    subkeys = torch.randn(*heads_shape, 2, n_keys, half, device=device) - 0.5
    (scores, indices), (ref_scores, ref_indices) = both_methods(query, subkeys, knn)
    assert scores.shape == indices.shape == (*lead, *heads_shape, knn)
    assert indices.dtype == torch.int64 and scores.dtype == query.dtype
    # Random floats: no ties, so the same slots in the same order.
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    flat_query = query.reshape(-1, heads or 1, 2 * half)  # (M, H, k_dim)
    all_subkeys = subkeys.reshape(heads or 1, 2, n_keys, half)  # (H, 2, n, half)
    brute = brute_force_indices(flat_query, all_subkeys, knn)  # (M, H, knn)
    assert torch.equal(indices.reshape(brute.shape), brute)


def test_sub_keys_streamed_in_several_blocks(monkeypatch, device):
    """n = 40 in blocks of 16: the running per-half top list merges three blocks, the last one
    ragged."""
    monkeypatch.setattr(search_triton, "_MAX_BLOCK_N", 16)
    torch.manual_seed(1)
    query = torch.randn(9, 2, 8, device=device)  # (M, H, k_dim)
    subkeys = torch.randn(2, 2, 40, 4, device=device)  # (H, 2, n, k_dim/2)
    (scores, indices), (ref_scores, ref_indices) = both_methods(query, subkeys, 6)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)


def tie_rule_top(query, subkeys, knn):
    """The documented order, spelled out over all n^2 slots: total score descending, then the
    first half's rank, then the second's; each half ranks by score descending, then id."""
    _, _, n_keys, half = subkeys.shape
    halves = query.unflatten(-1, (2, half))  # (M, H, 2, half)
    half_scores = torch.einsum("mhtd,htnd->mhtn", halves, subkeys)  # (M, H, 2, n)
    order = half_scores.sort(dim=-1, descending=True, stable=True).indices  # ids by rank
    rank = order.argsort(dim=-1)  # (M, H, 2, n) rank of each id
    total = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # (M, H, n, n)
    pair_rank = rank[:, :, 0, :, None] * n_keys + rank[:, :, 1, None, :]  # (M, H, n, n)
    # Sort by pair rank, then stably by score: ties keep the pair-rank order.
    by_rank = pair_rank.flatten(-2).argsort(dim=-1)  # (M, H, n*n) slots
    totals = total.flatten(-2).gather(-1, by_rank)
    best = totals.sort(dim=-1, descending=True, stable=True).indices[..., :knn]
    return by_rank.gather(-1, best)  # (M, H, knn) slots


@pytest.mark.parametrize(("n_keys", "knn"), [(6, 5), (6, 14), (4, 16)])
def test_ties_follow_the_documented_rule(n_keys, knn, device):
    """Small integer scores tie everywhere, inside the staircase and across its edge: the slots
    are exactly those of the rule, in its order, and a valid top knn."""
    generator = torch.Generator().manual_seed(2)
    query = torch.randint(-1, 2, (7, 2, 4), generator=generator).float().to(device)
    subkeys = torch.randint(-1, 2, (2, 2, n_keys, 2), generator=generator).float().to(device)
    (scores, indices), (ref_scores, _) = both_methods(query, subkeys, knn)
    assert torch.equal(indices, tie_rule_top(query, subkeys, knn))
    assert torch.equal(scores, ref_scores), "the top knn values are unique even with ties"


@pytest.mark.parametrize("knn", [5, 9, 30])
def test_all_scores_equal_gives_the_first_slots(knn, device):
    """Zero sub-keys: every slot scores 0, and the rule picks slots 0 .. knn-1 (ranks are ids)."""
    query = torch.randn(3, 4, device=device)  # (M, k_dim)
    subkeys = torch.zeros(2, 6, 2, device=device)  # (2, n, k_dim/2)
    scores, indices = product_topk(query, subkeys, knn, method="triton")
    assert torch.equal(indices, torch.arange(knn, device=device).expand(3, knn))
    assert not scores.any()


def test_gradients_equal_reference_autograd(device):
    torch.manual_seed(3)
    query = torch.randn(10, 3, 8, device=device)  # (N, H, k_dim)
    subkeys = torch.randn(3, 2, 12, 4, device=device)  # (H, 2, n, k_dim/2)
    weights = torch.randn(10, 3, 9, device=device)  # (N, H, knn)
    results = []
    for method in ("triton", "reference"):
        q, k = query.clone().requires_grad_(), subkeys.clone().requires_grad_()
        scores, indices = product_topk(q, k, 9, method=method)
        (scores * weights).sum().backward()
        results.append((scores.detach(), indices, q.grad, k.grad))
    (scores, indices, query_grad, key_grad), (ref_scores, ref_indices, ref_qg, ref_kg) = results
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(query_grad, ref_qg)
    torch.testing.assert_close(key_grad, ref_kg)


def test_two_runs_are_bit_identical(device):
    """Forward and backward: the same bits on every run."""
    torch.manual_seed(4)
    query = torch.randn(12, 2, 6, device=device)  # (N, H, k_dim)
    subkeys = torch.randn(2, 2, 10, 3, device=device)  # (H, 2, n, k_dim/2)

    def run():
        q, k = query.clone().requires_grad_(), subkeys.clone().requires_grad_()
        scores, indices = product_topk(q, k, 8, method="triton")
        scores.square().sum().backward()
        return scores.detach(), indices, q.grad, k.grad

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_queries_score_as_torch(dtype, device):
    """16-bit half scores and sums round as torch rounds them: the same top scores as the
    reference, bit for bit, and every slot chosen has the score reported (ties may pick other
    slots than torch's topk)."""
    torch.manual_seed(5)
    query = torch.randn(11, 2, 10, device=device, dtype=dtype)  # (N, H, k_dim)
    subkeys = torch.randn(2, 2, 12, 5, device=device, dtype=dtype)  # (H, 2, n, k_dim/2)
    (scores, indices), (ref_scores, _) = both_methods(query, subkeys, 10)
    assert scores.dtype == dtype
    assert torch.equal(scores, ref_scores)
    half_scores = torch.einsum("nhtd,htsd->nhts", query.unflatten(-1, (2, 5)), subkeys)
    first = half_scores[:, :, 0].gather(-1, indices // 12)  # (N, H, 10)
    second = half_scores[:, :, 1].gather(-1, indices % 12)
    assert torch.equal(first + second, scores)


def test_bfloat16_rounds_to_nearest_even(device):
    """First-half scores built to round three ways in bfloat16 (8 bits): 1 + 2^-8 is halfway and
    rounds to the even 1; 1 + 2^-7 + 2^-8 is halfway and rounds to the even 1 + 2^-6; 1 + 2^-8 +
    2^-9 is past halfway and rounds up to 1 + 2^-7. Truncating, or rounding halves up, differs."""
    query = torch.ones(1, 4, device=device, dtype=torch.bfloat16)  # (1, k_dim)
    first = [[1, 2**-8], [1 + 2**-7, 2**-8], [1, 2**-8 + 2**-9]]  # (n=3, 2) sub-keys a, b, c
    subkeys = torch.tensor([first, [[0, 0]] * 3], device=device, dtype=torch.bfloat16)
    (scores, indices), (ref_scores, _) = both_methods(query, subkeys, 9)
    expected = [1 + 2**-6] * 3 + [1 + 2**-7] * 3 + [1.0] * 3  # b's slots, c's, a's
    assert scores.tolist() == ref_scores.tolist() == [expected]
    assert indices.tolist() == [[3, 4, 5, 6, 7, 8, 0, 1, 2]]


def test_autocast_scores_in_its_dtype(device):
    """Under autocast the reference scores in autocast's dtype; so does the kernel, with a
    16-bit query and float32 sub-keys."""
    torch.manual_seed(6)
    query = torch.randn(9, 2, 8, device=device)  # (N, H, k_dim)
    subkeys = torch.randn(2, 2, 10, 4, device=device)  # (H, 2, n, k_dim/2) float32
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for q in (query, query.bfloat16()):
            (scores, _), (ref_scores, _) = both_methods(q, subkeys, 6)
            assert scores.dtype == ref_scores.dtype == torch.bfloat16
            assert torch.equal(scores, ref_scores)


def test_empty_batch(device):
    query = torch.randn(0, 2, 8, device=device, requires_grad=True)  # (0, H, k_dim)
    subkeys = torch.randn(2, 2, 10, 4, device=device, requires_grad=True)
    scores, indices = product_topk(query, subkeys, 5, method="triton")
    assert scores.shape == indices.shape == (0, 2, 5)
    scores.sum().backward()
    assert not subkeys.grad.any()


def test_the_benchmark_staircase_fits_and_a_wide_one_does_not():
    """knn 32 over n = 1024 runs in the kernel; knn 128 (645 candidates) would spill registers."""
    assert search_triton.fits(32, 1024) and search_triton.fits(64, 1024)
    assert not search_triton.fits(128, 1024)
    assert search_triton.fits(256, 16), "knn > n: at most n^2 = 256 candidates"


def test_wide_staircase_takes_the_fast_path(monkeypatch, device):
    """A staircase over the register budget is searched by the fast torch path: same result,
    gradients included, and the kernel is not launched."""
    monkeypatch.setattr(search_triton, "_MAX_CANDIDATES_PAD", 8)
    launched = []
    fused = search_triton.fused_product_topk
    monkeypatch.setattr(
        search_triton, "fused_product_topk", lambda *a: launched.append(1) or fused(*a)
    )
    torch.manual_seed(7)
    query = torch.randn(6, 2, 8, device=device, requires_grad=True)  # (N, H, k_dim)
    subkeys = torch.randn(2, 2, 10, 4, device=device, requires_grad=True)
    assert not search_triton.fits(9, 10) and search_triton.fits(3, 10)
    (scores, indices), (ref_scores, ref_indices) = both_methods(query, subkeys, 9)
    assert not launched
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores)
    scores.sum().backward()
    assert query.grad is not None and subkeys.grad is not None


def test_float64_is_refused(device):
    query = torch.randn(3, 8, device=device, dtype=torch.float64)
    subkeys = torch.randn(2, 5, 4, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match=r'float64.*method="fast"'):
        product_topk(query, subkeys, 2, method="triton")


def run_without_interpreter(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose Triton compiles kernels instead of interpreting them."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )


def test_kernel_compiles_for_hopper_without_spilling(tmp_path):
    """The interpreter checks results, not that the GPU compiler takes the kernel: compile it for
    sm_90 (H100/H200; no GPU needed) and check that ptxas spills no registers, at knn 32 over
    n = 1024 in bfloat16 (autocast training) and at the widest staircase that fits, in float32."""
    code = (
        "import torch; from pkm_ref import search_triton as st\n"
        "widest = max(knn for knn in range(1, 300) if st.fits(knn, 1024))\n"
        "for knn, dtype in ((32, torch.bfloat16), (widest, torch.float32)):\n"
        "    st._compile_ahead(st._blocks(4096, knn, 1024, 64), dtype)\n"
    )
    # A fresh cache, so that ptxas runs and prints its report.
    result = run_without_interpreter(
        code, TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"(\d+) bytes spill stores", result.stdout) == ["0", "0"], result.stdout


def test_cpu_tensors_need_cuda_or_the_interpreter():
    """Without TRITON_INTERPRET=1, CPU tensors are refused with what to do (a fresh process: this
    one decided when it first imported the kernels)."""
    code = (
        "import torch; from pkm_ref import product_topk; "
        "product_topk(torch.randn(3, 8), torch.randn(2, 5, 4), 2, method='triton')"
    )
    result = run_without_interpreter(code)
    assert result.returncode != 0
    assert "runs on CUDA tensors" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_missing_triton_names_the_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "pkm_ref.search_triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    with pytest.raises(ModuleNotFoundError, match="pip install triton"):
        product_topk(torch.randn(3, 8), torch.randn(2, 5, 4), 2, method="triton")
