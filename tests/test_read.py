"""The value read (pkm_ref.read): every method computes gather_sum, in float32 or bfloat16 tables.

The Triton method's kernels are tested in test_read_triton.py.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from pkm_ref.read import READ_METHODS, gather_sum, read_bags

TORCH_METHODS = ("embedding_bag", "compiled")


def bags(device, dtype=torch.float32, slots=50, width=6, seed=7):
    """A table (N, D), and 9 bags of 12 reads with repeats within and across bags."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(slots, width, generator=generator).to(device, dtype)  # (N, D)
    indices = torch.randint(slots, (9, 12), generator=generator).to(device)  # (B, J)
    indices[0, :4] = 3  # one slot four times in one bag, and again in another
    indices[5, 7] = 3
    weights = torch.rand(9, 12, generator=generator).to(device)  # (B, J) float32
    return table, indices, weights


def test_gather_sum_equals_the_embedding_bag_read(device):
    table, indices, weights = bags(device)
    expected = F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")  # (B, D)
    torch.testing.assert_close(gather_sum(table, indices, weights), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", TORCH_METHODS)
def test_torch_methods_read_float32_and_bfloat16_tables(method, dtype, device):
    """A float32 output, equal to the float64 sum of the same values (EmbeddingBag rounds a
    bfloat16 table's weights and sum to bfloat16); the gradients too, the table's in its dtype."""
    table, indices, weights = bags(device, dtype)
    table.requires_grad_()
    weights.requires_grad_()
    out = read_bags(table, indices, weights, method)  # (B, D)
    assert out.dtype == torch.float32 and out.shape == (9, 6)
    reference_table = table.detach().double().requires_grad_()
    reference_weights = weights.detach().double().requires_grad_()
    reference = gather_sum(reference_table, indices, reference_weights)  # (B, D) float64
    grad = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grad = grad.to(device)  # (B, D)
    rounded = dtype == torch.bfloat16 and method == "embedding_bag"  # weights and sum: bfloat16
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if rounded else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), reference, **tolerance)
    out.backward(grad.float())
    reference.backward(grad)
    assert table.grad.dtype == dtype and weights.grad.dtype == torch.float32
    grad_tolerance = tolerance if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(table.grad.double(), reference_table.grad, **grad_tolerance)
    torch.testing.assert_close(weights.grad.double(), reference_weights.grad, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_bag_sparse_gradient_holds_the_rows_read(dtype):
    table, indices, weights = bags("cpu", dtype)
    table.requires_grad_()
    read_bags(table, indices, weights, sparse=True).sum().backward()
    assert table.grad.is_sparse and table.grad.dtype == dtype
    assert set(table.grad.coalesce().indices()[0].tolist()) == set(indices.flatten().tolist())


def test_bad_methods_are_refused():
    table, indices, weights = bags("cpu")
    with pytest.raises(ValueError, match=r"method must be one of .*'triton'.*got 'cuda'"):
        read_bags(table, indices, weights, "cuda")
    with pytest.raises(ValueError, match=r'method="compiled" gives the table a dense gradient'):
        read_bags(table, indices, weights, "compiled", sparse=True)
    assert READ_METHODS == ("embedding_bag", "compiled", "triton")


def test_the_triton_method_without_triton_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "pkm_ref.read_triton", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed: import fails
    table, indices, weights = bags("cpu")
    with pytest.raises(ImportError, match="pip install triton"):
        read_bags(table, indices, weights, "triton")


def test_importing_pkm_ref_does_not_import_triton():
    """The core depends on torch alone: Triton is imported by the first Triton read."""
    import subprocess

    code = "import sys, pkm_ref, pkm_ref.read; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
