"""The memory layers: shapes, the value read, gradients, sparse values, usage recording."""

import pytest
import torch

from conftest import materialise_product_keys
from pkm_ref import FlatKeyMemory, ProductKeyMemory, product_topk


def small_memory(**overrides) -> ProductKeyMemory:
    options = dict(input_dim=12, output_dim=10, n_keys=6, k_dim=8, heads=2, knn=4)
    options.update(overrides)
    return ProductKeyMemory(**options)


def manual_read(memory, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by hand: gather the selected value rows, weigh by softmax, sum."""
    query = memory.query(x.reshape(-1, memory.input_dim))  # (N, H, k_dim)
    scores, indices = product_topk(query, memory.subkeys, memory.knn)  # (N, H, knn)
    weights = scores.softmax(dim=-1)  # (N, H, knn)
    rows = memory.values.weight[indices]  # (N, H, knn, output_dim)
    return (weights.unsqueeze(-1) * rows).sum(dim=(1, 2))  # (N, output_dim)


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (2, 2, 2, 12)])
def test_any_leading_shape(shape, device):
    memory = small_memory().to(device)
    out = memory(torch.randn(*shape, device=device))
    assert out.shape == (*shape[:-1], 10)
    assert memory.n_slots == 36 and memory.n_keys == 6


def test_embedding_bag_read_equals_gather_and_weighted_sum(device):
    torch.manual_seed(0)
    memory = small_memory(query_norm="layernorm").to(device)
    x = torch.randn(3, 7, 12, device=device)
    torch.testing.assert_close(memory(x).reshape(-1, 10), manual_read(memory, x))


def test_flat_memory_equals_product_memory_on_the_same_keys():
    torch.manual_seed(1)
    product = small_memory(query_norm=None)
    flat = FlatKeyMemory(12, 10, n_slots=36, k_dim=8, heads=2, knn=4, query_norm=None)
    flat.load_state_dict(
        {**{k: v for k, v in product.state_dict().items() if k != "subkeys"},
         "keys": materialise_product_keys(product.subkeys.detach())}
    )  # fmt: skip
    x = torch.randn(20, 12)
    torch.testing.assert_close(flat(x), product(x))


def test_gradients_reach_query_selected_subkeys_and_only_read_rows():
    torch.manual_seed(2)
    memory = small_memory(n_keys=10, query_norm="layernorm", sparse=True)
    memory.record_usage = False
    x = torch.randn(3, 12)
    out = memory(x)
    out.pow(2).sum().backward()
    assert memory.query.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        query = memory.query(x)
        _, indices = product_topk(query, memory.subkeys, memory.knn)  # (3, H, knn)
    # Sub-keys: exactly those that appear in a selected slot get a gradient.
    for head in range(2):
        grad = memory.subkeys.grad[head].abs().sum(-1) > 0  # (2, n)
        assert set(grad[0].nonzero().flatten().tolist()) == set(
            (indices[:, head] // 10).flatten().tolist()
        )
        assert set(grad[1].nonzero().flatten().tolist()) == set(
            (indices[:, head] % 10).flatten().tolist()
        )
    # Values: a sparse gradient whose rows are exactly the slots read.
    grad = memory.values.weight.grad
    assert grad.is_sparse
    rows = set(grad.coalesce().indices()[0].tolist())
    assert rows == set(indices.flatten().tolist())


def test_dense_value_gradient_is_zero_off_the_read_rows():
    torch.manual_seed(3)
    memory = small_memory(n_keys=8)
    x = torch.randn(2, 12)
    memory(x).sum().backward()
    touched = memory.values.weight.grad.abs().sum(-1) > 0  # (n_slots,)
    assert 0 < int(touched.sum()) <= 2 * memory.heads * memory.knn


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", None])
def test_gradcheck_tiny_layer(norm):
    torch.manual_seed(4)
    memory = small_memory(n_keys=4, k_dim=4, heads=2, knn=3, query_norm=norm).double()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(memory, (x,))


def test_layers_start_with_different_keys():
    """No fixed per-module seed: two layers must not start with identical keys."""
    first, second = small_memory(), small_memory()
    assert not torch.equal(first.subkeys, second.subkeys)
    assert not torch.equal(first.values.weight, second.values.weight)


def test_values_are_not_zero_initialised():
    memory = small_memory(output_dim=64)
    std = float(memory.values.weight.detach().std())
    assert 0.5 * 64**-0.5 < std < 1.5 * 64**-0.5


def test_record_usage_in_eval_mode_only_real_positions():
    torch.manual_seed(5)
    memory = small_memory()
    memory.record_usage = True
    x = torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    memory(x, mask)  # training mode: nothing recorded
    assert memory.last_indices is None
    memory.eval()
    with torch.no_grad():
        memory(x, mask)
    assert memory.last_indices.shape == (8, 2, 4)
    assert memory.last_weights.shape == (8, 2, 4)
    torch.testing.assert_close(memory.last_weights.sum(-1), torch.ones(8, 2))


def test_reference_size_forward_backward_on_cpu():
    """The issue's acceptance check: 512^2 slots, 4 heads, knn 32, input 256, batch (8, 128)."""
    memory = ProductKeyMemory(256, 256, n_keys=512, k_dim=128, heads=4, knn=32)
    x = torch.randn(8, 128, 256, requires_grad=True)
    out = memory(x)
    out.mean().backward()
    assert out.shape == (8, 128, 256)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("layer_class", [ProductKeyMemory, FlatKeyMemory])
def test_compiled_read_equals_the_embedding_bag_read(layer_class, device):
    """Same outputs and gradients; the compiled read runs in a fused torch.compile kernel."""
    size = {"n_keys": 8} if layer_class is ProductKeyMemory else {"n_slots": 64}
    torch.manual_seed(8)
    bag = layer_class(12, 10, **size, k_dim=8, heads=2, knn=4).to(device)
    compiled = layer_class(12, 10, **size, k_dim=8, heads=2, knn=4, compiled_read=True).to(device)
    compiled.load_state_dict(bag.state_dict())
    x = torch.randn(3, 5, 12, device=device)  # (B, T, input_dim)
    outputs = [layer(x) for layer in (bag, compiled)]  # (B, T, output_dim) each
    torch.testing.assert_close(outputs[1], outputs[0])
    for out in outputs:
        out.square().sum().backward()
    for (name, a), b in zip(bag.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    assert "compiled_read=True" in repr(compiled)


def test_compiled_read_refuses_sparse_gradients():
    with pytest.raises(ValueError, match=r"compiled_read=True.*sparse=True"):
        ProductKeyMemory(8, 8, n_keys=4, k_dim=8, heads=1, knn=2, sparse=True, compiled_read=True)


@pytest.mark.parametrize("layer_class", ["product", "flat"])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_an_empty_output(layer_class, training):
    """A batch with no tokens (an empty shard, a filtered batch) passes through with its shape."""
    layer = small_memory() if layer_class == "product" else FlatKeyMemory(12, 10, 36, 8, 2, 4)
    layer.train(training)
    out = layer(torch.randn(0, 5, 12))
    assert out.shape == (0, 5, 10)


def test_dropout_only_in_training():
    torch.manual_seed(6)
    memory = small_memory(input_dropout=0.5, query_dropout=0.5, value_dropout=0.5)
    x = torch.randn(8, 12)
    memory.eval()
    torch.testing.assert_close(memory(x), memory(x))
    memory.train()
    assert not torch.equal(memory(x), memory(x))


def test_softmax_weights_are_not_rounded_to_16_bits_under_autocast():
    """The read weighs the value rows by float32 softmax weights, even when scores are bfloat16."""
    torch.manual_seed(7)
    memory = small_memory(query_norm="layernorm").eval()
    memory.record_usage = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory(torch.randn(6, 12))
    assert memory.last_weights.dtype == torch.float32
    sums = memory.last_weights.sum(-1)  # (N, H)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sparse, compiled_read", [(False, False), (True, False), (False, True)])
def test_bfloat16_values_are_the_float32_ones_rounded(sparse, compiled_read):
    """value_dtype=torch.bfloat16: with one seed the table is the float32 one rounded; the layer
    reads it (EmbeddingBag or compiled) with float32 weights into a float32 output, like the
    model around it, and the table gets a bfloat16 gradient (sparse with sparse=True)."""
    options = dict(query_norm="layernorm", sparse=sparse, compiled_read=compiled_read)
    torch.manual_seed(9)
    full = small_memory(**options)
    torch.manual_seed(9)
    half = small_memory(**options, value_dtype=torch.bfloat16)
    assert half.value_dtype == half.values.weight.dtype == torch.bfloat16
    assert torch.equal(half.values.weight, full.values.weight.bfloat16())
    assert "value_dtype=torch.bfloat16" in repr(half) and "value_dtype" not in repr(full)
    x = torch.randn(3, 5, 12)  # (B, T, input_dim)
    out = half(x)  # (B, T, output_dim)
    assert out.dtype == torch.float32
    with torch.no_grad():
        full.values.weight.copy_(half.values.weight)  # the same values, read in float32
    torch.testing.assert_close(out, full(x), rtol=1e-2, atol=1e-2)
    out.square().sum().backward()
    grad = half.values.weight.grad
    assert grad.dtype == torch.bfloat16 and grad.is_sparse == sparse
    assert half.query.proj.weight.grad.dtype == torch.float32


def test_value_dtype_must_be_float32_or_bfloat16():
    with pytest.raises(ValueError, match=r"value_dtype must be one of .*got torch.float16"):
        small_memory(value_dtype=torch.float16)
