"""Batchnorm queries: statistics over (N, C), padding masked out, and the causal leak."""

import torch
from torch import nn

from pkm_ref import MaskedBatchNorm1d, ProductKeyMemory, QueryNetwork


def test_statistics_are_per_feature_over_all_positions():
    """A (batch, time, dim) input is flattened to (N, C): each feature has mean 0 over tokens."""
    torch.manual_seed(0)
    network = QueryNetwork(input_dim=6, k_dim=4, heads=2, norm="batchnorm")
    x = torch.randn(3, 7, 6) * 5 + 2  # (B, T, input_dim)
    query = network(x.reshape(-1, 6))  # (B*T, H, k_dim)
    features = query.reshape(-1, 8)  # (B*T, C)
    torch.testing.assert_close(features.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    # The bug we avoid: BatchNorm1d on (B, T, C) reads T as the channel axis.
    wrong_axis = nn.BatchNorm1d(7)(network.proj(x))  # normalises over time, per time step
    assert not torch.allclose(wrong_axis.reshape(-1, 8).mean(0), torch.zeros(8), atol=1e-3)


def test_memory_batchnorm_flattens_time():
    """The layer's batchnorm sees (B*T, C): same output as feeding the tokens as a flat batch."""
    torch.manual_seed(1)
    memory = ProductKeyMemory(8, 8, n_keys=4, k_dim=4, heads=1, knn=2)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(memory(x).reshape(10, 8), memory(x.reshape(10, 8)))


def trained_affine(norm: MaskedBatchNorm1d) -> MaskedBatchNorm1d:
    """``norm`` with a non-trivial affine (fresh ones are weight 1, bias 0: they hide mistakes)."""
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.num_features))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, norm.num_features))
    return norm


def test_mask_keeps_padding_out_of_outputs_and_running_stats():
    torch.manual_seed(2)
    real = torch.randn(10, 4) * 3 + 1  # (N_real, C)
    reference = trained_affine(MaskedBatchNorm1d(4))
    expected = reference(real)  # no padding at all
    expected.square().sum().backward()
    for n_pad, pad_value in [(3, 0.0), (30, 100.0)]:
        layer = trained_affine(MaskedBatchNorm1d(4))
        padded = torch.cat([real, torch.full((n_pad, 4), pad_value)])  # (N, C)
        mask = torch.cat([torch.ones(10, dtype=torch.bool), torch.zeros(n_pad, dtype=torch.bool)])
        out = layer(padded, mask)
        torch.testing.assert_close(out[:10], expected)
        out[:10].square().sum().backward()
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
        torch.testing.assert_close(layer.running_mean, reference.running_mean)
        torch.testing.assert_close(layer.running_var, reference.running_var)
        # Without the mask the padding shifts both (the bug this class fixes).
        naive = nn.BatchNorm1d(4)
        assert not torch.allclose(naive(padded)[:10], expected, atol=1e-3)


def test_masked_batchnorm_matches_batchnorm_without_mask():
    torch.manual_seed(3)
    x = torch.randn(16, 5)
    ours, theirs = MaskedBatchNorm1d(5), nn.BatchNorm1d(5)
    mask = torch.ones(16, dtype=torch.bool)
    torch.testing.assert_close(ours(x, mask), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_memory_mask_through_the_layer():
    torch.manual_seed(4)
    memory = ProductKeyMemory(6, 6, n_keys=5, k_dim=4, heads=2, knn=3)
    x = torch.randn(2, 8, 6)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 6:] = False
    first = memory(x, mask)
    x_changed = x.clone()
    x_changed[:, 6:] = 1000.0  # only padded positions change
    second = memory(x_changed, mask)
    torch.testing.assert_close(first[mask], second[mask])


def test_train_time_batchnorm_leaks_across_positions_layernorm_does_not():
    """Changing a later token changes an earlier token's query under train-mode batchnorm."""
    torch.manual_seed(5)
    x = torch.randn(1, 6, 8)
    x_future = x.clone()
    x_future[0, 5] += 3.0  # change only the last position
    for norm, leaks in [("batchnorm", True), ("layernorm", False)]:
        network = QueryNetwork(8, 4, 2, norm)
        early = lambda inputs, net=network: net(inputs.reshape(-1, 8))[:5]  # noqa: E731
        assert (not torch.allclose(early(x), early(x_future))) == leaks, norm
        network.eval()  # running statistics: no leak
        torch.testing.assert_close(early(x), early(x_future))


def test_masked_batchnorm_under_bfloat16_autocast():
    """Under autocast the input is 16-bit; statistics stay float32 and so do the running buffers."""
    torch.manual_seed(5)
    x = (torch.randn(12, 4) * 3 + 1).bfloat16()  # (N, C) as a 16-bit linear layer would give it
    mask = torch.arange(12) < 9  # (N,) three padded rows
    layer, reference = MaskedBatchNorm1d(4), MaskedBatchNorm1d(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, mask)  # (N, C)
    expected = reference(x[mask].float())  # the same real rows, in float32, no padding
    assert out.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(out[:9].float(), expected, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_masked_batchnorm_in_float64():
    """A float64 module keeps float64 statistics and buffers (float32 must not be forced on it)."""
    torch.manual_seed(6)
    x = torch.randn(12, 4, dtype=torch.float64) * 3 + 1  # (N, C)
    mask = torch.arange(12) < 9  # (N,)
    layer, reference = MaskedBatchNorm1d(4).double(), MaskedBatchNorm1d(4).double()
    out = layer(x, mask)
    assert out.dtype == torch.float64 and layer.running_var.dtype == torch.float64
    torch.testing.assert_close(out[:9], reference(x[mask]))
    torch.testing.assert_close(layer.running_var, reference.running_var)
