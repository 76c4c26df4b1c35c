"""Batchnorm queries: statistics over (N, C), padding masked out, the causal leak, and running
averages that a NaN batch cannot poison."""

import pytest
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
def test_a_non_finite_batch_never_reaches_the_running_averages(device, bad, masked):
    """One batch with a NaN (or an infinity) in training used to make the running averages NaN
    for good, and every later clean input in eval mode came out NaN, silently. The averages of
    before that batch stay; clean batches after it update them again."""
    torch.manual_seed(7)
    memory = ProductKeyMemory(8, 8, n_keys=4, k_dim=4, heads=2, knn=2).to(device)
    norm = memory.query.norm
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)  # (B, T)
    mask[:, -1] = False  # the padded path of MaskedBatchNorm1d, or the fused one without a mask
    options = {"mask": mask} if masked else {}
    memory(torch.randn(2, 6, 8, device=device), **options)  # one clean batch: (B, T, 8)

    def state() -> list[torch.Tensor]:
        return [norm.running_mean, norm.running_var, norm.num_batches_tracked]

    before = [b.clone() for b in state()]

    poisoned = torch.randn(2, 6, 8, device=device)  # (B, T, 8)
    poisoned[0, 0, 3] = bad  # one value of a real position
    assert not memory(poisoned, **options).isfinite().all()  # this batch's output is lost
    assert all(map(torch.equal, state(), before))

    assert memory(torch.randn(2, 6, 8, device=device), **options).isfinite().all()  # training
    assert norm.num_batches_tracked.item() == 2 and not torch.equal(norm.running_mean, before[0])
    memory.eval()
    assert memory(torch.randn(2, 6, 8, device=device)).isfinite().all()  # eval: running averages


def test_a_non_finite_value_in_a_padded_row_is_ignored():
    """The mask keeps padding out of the statistics: a NaN there changes nothing."""
    norm = MaskedBatchNorm1d(4)
    x = torch.randn(8, 4)  # (N, C)
    x[-1] = float("nan")
    out = norm(x, torch.arange(8) < 7)  # (N, C)
    assert out[:7].isfinite().all() and norm.num_batches_tracked.item() == 1
    assert norm.running_mean.isfinite().all() and not torch.equal(norm.running_mean, torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU synchronisation needs CUDA")
def test_the_finite_check_does_not_synchronise_the_gpu():
    """The decision stays on the device: no host sync on the training hot path (without a
    mask; a mask costs one sync of its own, to find whether anything is padded)."""
    norm = MaskedBatchNorm1d(64).cuda()
    x = torch.randn(256, 64, device="cuda")  # (N, C)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
