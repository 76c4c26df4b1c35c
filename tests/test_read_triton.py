"""The Triton value read (pkm_ref.read_triton) against torch: forward, both gradients, sparse and
dense, determinism, edge shapes, errors.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported); with one, on "cuda", compiled. Shapes
are tiny: the interpreter runs each program in numpy, a few ms each.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton read needs triton (Linux)")

from pkm_ref import read_triton  # after the skip: this module imports triton
from pkm_ref.read import gather_sum, read_bags


@pytest.fixture
def kernel_device(device) -> torch.device:
    """The ``device`` fixture's device, where this process can run the kernels."""
    if device.type == "cpu" and not read_triton.INTERPRETED:
        pytest.skip(
            "CPU tensors need Triton's interpreter, which conftest.py turns on only without a GPU"
        )
    return device


def bags(device, dtype, slots, width, batch, reads, seed=0):
    """A table (N, D) and ``batch`` bags of ``reads`` slots with repeats within and across bags:
    slot 3 is read 20 times (more than one step of the table-gradient kernel)."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(slots, width, generator=generator, dtype=torch.float64)  # (N, D)
    indices = torch.randint(slots, (batch, reads), generator=generator)  # (B, J)
    indices.view(-1)[: 20 * 3 : 3] = 3  # 20 reads of slot 3, several in one bag
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(batch, reads, generator=generator, dtype=weight_dtype)  # (B, J)
    return table.to(device, dtype), indices.to(device), weights.to(device)


# (N, D, B, J): D and J not powers of two; the last spans two D tiles and two J steps.
SHAPES = [(40, 10, 6, 12), (30, 300, 2, 40)]


def read_and_grads(table, indices, weights, grad, method, sparse=False):
    table = table.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    if method == "gather_sum":
        out = gather_sum(table, indices, weights)  # (B, D)
    else:
        out = read_bags(table, indices, weights, method, sparse)  # (B, D)
    grad_table, grad_weights = torch.autograd.grad(out, (table, weights), grad)
    return out, grad_table, grad_weights


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_equal_torch(shape, dtype, kernel_device):
    """Output equal to EmbeddingBag's (float32) and to gather_sum, in float32 for both tables; both
    gradients equal autograd's of gather_sum, to float32 rounding (the table's: in its dtype)."""
    table, indices, weights = bags(kernel_device, dtype, *shape)
    grad = torch.randn(shape[2], shape[1]).to(kernel_device)  # (B, D)
    out, grad_table, grad_weights = read_and_grads(table, indices, weights, grad, "triton")
    assert out.dtype == grad_weights.dtype == torch.float32 and grad_table.dtype == dtype
    if dtype == torch.float32:
        expected = F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
        torch.testing.assert_close(out, expected)
    # The reference in float64 from the same (rounded) inputs: only the outputs' rounding differs.
    reference = read_and_grads(
        table.double(), indices, weights.double(), grad.double(), "gather_sum"
    )
    exact = {"rtol": 1e-5, "atol": 1e-5}
    rounded = exact if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for name, ours, theirs, tolerance in zip(
        ("out", "table", "weights"), (out, grad_table, grad_weights), reference,
        (exact, rounded, exact), strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(ours.double(), theirs, **tolerance, msg=name)


def test_gradcheck_in_float64(kernel_device):
    """The kernels take float64 tables (summing in float64): gradcheck both gradients."""
    table, indices, weights = bags(kernel_device, torch.float64, slots=7, width=3, batch=3, reads=5)
    indices[1, :3] = indices[0, 0]  # repeats within a bag and across bags
    table.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda table, weights: read_bags(table, indices, weights, "triton"), (table, weights)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gradient_is_the_dense_one_on_the_rows_read(dtype, kernel_device):
    """sparse=True: a coalesced COO gradient holding exactly the slots read, with the dense
    gradient's rows bit for bit; SparseAdam takes it and moves only those rows."""
    table, indices, weights = bags(kernel_device, dtype, *SHAPES[0])
    grad = torch.ones(SHAPES[0][2], SHAPES[0][1], device=kernel_device)  # (B, D)
    _, dense, _ = read_and_grads(table, indices, weights, grad, "triton")
    _, sparse, _ = read_and_grads(table, indices, weights, grad, "triton", sparse=True)
    assert sparse.is_sparse and sparse.is_coalesced() and sparse.dtype == dtype
    rows = sparse.indices()[0]  # (U,)
    assert rows.tolist() == sorted(set(indices.flatten().tolist()))
    assert torch.equal(sparse.to_dense(), dense)
    parameter = torch.nn.Parameter(table.float())  # SparseAdam on the float32 table
    parameter.grad = sparse.float()
    before = parameter.detach().clone()
    torch.optim.SparseAdam([parameter], lr=0.1).step()
    moved = (parameter.detach() != before).any(dim=1).nonzero().flatten()  # (U,)
    assert moved.tolist() == rows.tolist()


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_is_deterministic(sparse, kernel_device):
    """Two backward passes give the same bits (no float atomics: reads sorted by slot)."""
    table, indices, weights = bags(kernel_device, torch.float32, *SHAPES[0])
    grad = torch.randn(SHAPES[0][2], SHAPES[0][1]).to(kernel_device)  # (B, D)
    first, second = (read_and_grads(table, indices, weights, grad, "triton", sparse)
                     for _ in range(2))  # fmt: skip
    for ours, again in zip(first[1:], second[1:], strict=True):
        ours, again = (g.to_dense() if g.is_sparse else g for g in (ours, again))
        assert torch.equal(ours, again)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch, reads", [(0, 5), (3, 0)])
def test_empty_batches_and_bags(batch, reads, sparse, kernel_device):
    """No bags (B = 0) or empty bags (J = 0): zeros of the right shapes, and zero gradients."""
    table = torch.randn(8, 5, device=kernel_device, requires_grad=True)  # (N, D)
    indices = torch.zeros(batch, reads, dtype=torch.long, device=kernel_device)  # (B, J)
    weights = torch.rand(batch, reads, device=kernel_device, requires_grad=True)  # (B, J)
    out = read_bags(table, indices, weights, "triton", sparse)  # (B, D)
    assert out.shape == (batch, 5) and not out.any()
    out.sum().backward()
    grad = table.grad.to_dense() if sparse else table.grad
    assert table.grad.is_sparse == sparse and grad.shape == (8, 5) and not grad.any()
    assert weights.grad.shape == (batch, reads)


def test_slots_outside_the_table_read_zeros_and_get_no_gradient(kernel_device):
    """The kernels never touch memory outside the table; the layers never produce such slots."""
    table = torch.randn(6, 4, device=kernel_device, requires_grad=True)  # (N, D)
    indices = torch.tensor([[0, 6, -1, 2]], device=kernel_device)  # (1, 4): 6 and -1 outside
    weights = torch.ones(1, 4, device=kernel_device, requires_grad=True)  # (1, J)
    out = read_bags(table, indices, weights, "triton")  # (1, D)
    torch.testing.assert_close(out, table[0:1] + table[2:3])
    out.sum().backward()
    assert table.grad[[1, 3, 4, 5]].eq(0).all() and table.grad[[0, 2]].eq(1).all()
    assert weights.grad[0, 1:3].eq(0).all()


def test_int32_indices_and_strided_inputs(kernel_device):
    table, indices, weights = bags(kernel_device, torch.float32, *SHAPES[0])
    wide = torch.cat([weights, weights], dim=1)[:, ::2]  # (B, J) not contiguous
    expected = gather_sum(table, indices, wide)  # (B, D)
    torch.testing.assert_close(read_bags(table, indices.int(), wide, "triton"), expected)


def test_errors_name_the_bad_input(monkeypatch):
    table, indices, weights = bags("cpu", torch.float32, *SHAPES[0])
    with pytest.raises(TypeError, match=r"\(B, J\) int64 or int32, got torch.float32"):
        read_triton.bag_read(table, weights, weights)
    with pytest.raises(TypeError, match=r"weights must be floating with the shape of indices"):
        read_triton.bag_read(table, indices, weights[:, :3])
    with pytest.raises(TypeError, match=r"table must be \(N, D\) with a dtype in"):
        read_triton.bag_read(table.int(), indices, weights)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on one device"):
            read_triton.bag_read(table.cuda(), indices, weights)
    monkeypatch.setattr(read_triton, "INTERPRETED", False)  # CPU tensors, compiled kernels
    with pytest.raises(RuntimeError, match=r"runs on CUDA tensors.*TRITON_INTERPRET=1"):
        read_bags(table, indices, weights, "triton")


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pkm_ref import read_triton as rt

assert not rt.INTERPRETED
J, D = 128, 256  # the paper's reads per token (4 heads x 32) and a value width
for table, itemsize in (("fp32", 4), ("bf16", 2)):
    block_j, block_d, warps = rt._tiles(J, D, itemsize)
    _, slot_block_d, slot_warps = rt._tiles(rt._SLOT_BLOCK_READS, D, 4)
    kernels = (
        (rt._bag_read_kernel, [f"*{table}", "*i64", "*fp32", "*fp32", "i64"], block_j, block_d,
         warps),
        (rt._weight_grad_kernel, ["*fp32", f"*{table}", "*i64", "*fp32", "i64"], block_j,
         block_d, warps),
        (rt._slot_sum_kernel, ["*fp32", "*fp32", "*i64", "*i64", "*i64", "*i64", f"*{table}"],
         rt._SLOT_BLOCK_READS, slot_block_d, slot_warps),
    )
    for kernel, pointers, block_rows, block_cols, num_warps in kernels:
        names = kernel.arg_names
        signature = dict(zip(names, pointers + ["constexpr"] * 4, strict=True))
        first = len(pointers)
        constexprs = {(first,): J, (first + 1,): D, (first + 2,): block_rows,
                      (first + 3,): block_cols}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        assert compiled.asm["cubin"], kernel.__name__
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler may not: compile every kernel with Triton's own
    compiler and ptxas for sm_90 (H100/H200), float32 and bfloat16 tables. No GPU needed."""
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-3000:]
