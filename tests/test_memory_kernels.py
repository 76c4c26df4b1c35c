"""The memory layers' ``kernels`` option: the Triton kernels give the torch kernels' results
(outputs and every gradient), ``"auto"`` picks torch wherever Triton cannot or should not run, and
a wrong combination fails with a message that says what to choose.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter (the root conftest.py
sets TRITON_INTERPRET=1 before any kernel module is imported); with one, compiled, on "cuda".
Shapes are tiny: the interpreter runs each program in numpy.
"""

import sys

import pytest
import torch

from pkm_ref import memory as memory_module
from pkm_ref.memory import FlatKeyMemory, ProductKeyMemory, _runs_triton

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    memory_module._triton.available() is False, reason="triton is in the dev extra on Linux only"
)


@pytest.fixture(params=["cuda" if CUDA else "cpu"])
def kernel_device(request) -> torch.device:
    """The one device this process runs the Triton kernels on: CUDA, else the interpreter's CPU."""
    return torch.device(request.param)


def layer(kind: str, kernels: str, seed: int = 0, **options) -> torch.nn.Module:
    """A tiny product (64 slots) or flat (36 slots) layer; one seed gives the same parameters."""
    torch.manual_seed(seed)
    size = {"n_keys": 8} if kind == "product" else {"n_slots": 36}
    layer_class = ProductKeyMemory if kind == "product" else FlatKeyMemory
    return layer_class(12, 10, **size, k_dim=8, heads=2, knn=4, kernels=kernels, **options)


def forward_and_grads(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """The output and the gradients of the input and of every parameter (dense), by name."""
    x = x.detach().requires_grad_()
    out = module(x)  # (B, T, output_dim)
    out.backward(grad)
    grads = {"input": x.grad}
    for name, parameter in module.named_parameters():
        grads[name] = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
    return out, grads


@needs_triton
@pytest.mark.parametrize("kind", ["product", "flat"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_equal_torch_kernels(kind, sparse, value_dtype, kernel_device):
    """Same output; same gradients of the input, the query network, the (sub-)keys and the values
    (sparse ones too). A bfloat16 table: EmbeddingBag rounds its weights and sum to bfloat16, the
    Triton read weighs and sums in float32, hence the looser tolerance there."""
    options = dict(sparse=sparse, value_dtype=value_dtype)
    torch_layer = layer(kind, "torch", **options).to(kernel_device)
    triton_layer = layer(kind, "triton", **options).to(kernel_device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 12, generator=generator).to(kernel_device)  # (B, T, input_dim)
    grad = torch.randn(3, 5, 10, generator=generator).to(kernel_device)  # (B, T, output_dim)
    out, grads = forward_and_grads(triton_layer, x, grad)
    expected_out, expected_grads = forward_and_grads(torch_layer, x, grad)
    assert out.dtype == torch.float32
    tolerance = {} if value_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, expected_out, **tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        assert grads[name].dtype == expected.dtype, name
        torch.testing.assert_close(grads[name], expected, **tolerance, msg=name)
    assert triton_layer.values.weight.grad.is_sparse == sparse
    # Row-sparse: the rows read, no more (the same ones for both kernels).
    if sparse:
        rows = triton_layer.values.weight.grad.coalesce().indices()
        expected_rows = torch_layer.values.weight.grad.coalesce().indices()
        assert torch.equal(rows, expected_rows)


@needs_triton
def test_triton_kernels_read_the_torch_kernels_slots_in_eval_mode(kernel_device):
    """Eval mode, usage recording on: the slots and weights the two kernels record agree."""
    layers = [layer("product", k).to(kernel_device).eval() for k in ("torch", "triton")]
    x = torch.randn(4, 12, device=kernel_device)  # (N, input_dim)
    for module in layers:
        module.record_usage = True
        with torch.no_grad():
            module(x)
    assert torch.equal(layers[1].last_indices, layers[0].last_indices)
    torch.testing.assert_close(layers[1].last_weights, layers[0].last_weights)


def test_auto_is_torch_on_cpu_even_under_the_interpreter(monkeypatch):
    """The interpreter is for tests: "auto" runs torch on CPU tensors, whatever TRITON_INTERPRET
    says and whether triton imports or not; here the search and the read are seen being called."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def spy(name, function):
        def wrapper(*args):
            calls.append((name, args[-1] if name == "search" else args[3]))
            return function(*args)

        return wrapper

    monkeypatch.setattr(memory_module, "product_topk", spy("search", memory_module.product_topk))
    monkeypatch.setattr(memory_module, "read_bags", spy("read", memory_module.read_bags))
    layer("product", "auto")(torch.randn(4, 12))
    assert calls == [("search", "fast"), ("read", "embedding_bag")]
    calls.clear()
    layer("product", "auto", compiled_read=True)(torch.randn(4, 12))
    assert calls == [("search", "fast"), ("read", "compiled")]


@pytest.mark.parametrize(
    ("kernels", "compiled_read", "device", "dtype", "available", "interpreted", "expected"),
    [
        ("auto", False, "cuda", torch.float32, True, False, True),  # the GPU default
        ("auto", False, "cuda", torch.bfloat16, True, False, True),  # under autocast
        ("auto", False, "cpu", torch.float32, True, False, False),  # CPU: always torch
        ("auto", False, "cpu", torch.float32, True, True, False),  # ... even interpreted
        ("auto", False, "cuda", torch.float32, False, False, False),  # no triton
        ("auto", False, "cuda", torch.float32, True, True, False),  # interpreter on a GPU
        ("auto", False, "cuda", torch.float64, True, False, False),  # a dtype the search refuses
        ("auto", True, "cuda", torch.float32, True, False, False),  # compiled read: torch's
        ("torch", False, "cuda", torch.float32, True, False, False),
        ("triton", False, "cuda", torch.float32, True, False, True),
        ("triton", False, "cpu", torch.float32, True, True, True),  # how tests force it
    ],
)
def test_which_kernels_run(
    kernels, compiled_read, device, dtype, available, interpreted, expected, monkeypatch
):
    """The choice, device by device: a torch.device needs no GPU to be asked about."""
    pytest.importorskip("triton", reason="the choice is made with the kernel modules imported")
    from pkm_ref import read_triton, search_triton

    monkeypatch.setattr(memory_module._triton, "available", lambda: available)
    monkeypatch.setattr(search_triton, "INTERPRETED", interpreted)
    monkeypatch.setattr(read_triton, "INTERPRETED", interpreted)
    device = torch.device(device)
    assert _runs_triton(kernels, compiled_read, device, dtype, "ProductKeyMemory") is expected


def test_triton_where_it_cannot_run_names_the_layer(monkeypatch):
    """kernels="triton" on CPU tensors with compiled kernels: the layer's own message."""
    pytest.importorskip("triton", reason="the message comes from the kernel modules")
    from pkm_ref import read_triton

    monkeypatch.setattr(read_triton, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r'ProductKeyMemory\(kernels="triton"\) runs on CUDA'):
        layer("product", "triton")(torch.randn(4, 12))
    with pytest.raises(RuntimeError, match=r'FlatKeyMemory\(kernels="triton"\).*kernels="auto"'):
        layer("flat", "triton")(torch.randn(4, 12))


def test_without_triton_auto_is_torch_and_triton_says_how_to_install(monkeypatch):
    """No triton package: "auto" still runs (torch), "triton" names the package and the way out."""
    monkeypatch.setattr(memory_module._triton, "available", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton: ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "pkm_ref.read_triton", raising=False)
    assert layer("product", "auto")(torch.randn(4, 12)).shape == (4, 10)
    with pytest.raises(ModuleNotFoundError, match=r"pip install triton.*kernels=\"torch\""):
        layer("product", "triton")(torch.randn(4, 12))


def test_bad_kernels_and_combinations_are_refused():
    with pytest.raises(ValueError, match=r"kernels must be one of \['auto', 'torch', 'triton'\]"):
        layer("product", "cuda")
    with pytest.raises(ValueError, match=r'compiled_read=True .* kernels="triton"'):
        layer("flat", "triton", compiled_read=True)


def test_repr_names_the_kernels():
    assert "kernels='auto'" in repr(layer("product", "auto"))
    assert "kernels='triton'" in repr(layer("flat", "triton"))


@pytest.mark.skipif(not CUDA, reason="moving a layer between devices needs a GPU")
def test_auto_follows_the_layer_between_devices():
    """One "auto" layer: torch on the CPU, Triton on the GPU, torch again back on the CPU; the same
    output each time (the slots are found exactly by both)."""
    module = layer("product", "auto").eval()
    x = torch.randn(6, 12)  # (N, input_dim)
    with torch.no_grad():
        on_cpu = module(x)
        on_gpu = module.cuda()(x.cuda())
        again = module.cpu()(x)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    assert torch.equal(again, on_cpu)
