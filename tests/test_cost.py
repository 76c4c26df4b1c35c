"""The analytic cost model matches the real modules' parameter counts."""

import pytest
from torch import nn

from pkm_ref import FlatKeyMemory, ProductKeyMemory, ffn_cost, flat_memory_cost, product_memory_cost
from pkm_ref.cost import all_reduce_bytes, product_vs_flat_speedup, sharded_read_bytes


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", None])
def test_parameter_counts_match_modules(norm):
    product = ProductKeyMemory(24, 20, n_keys=10, k_dim=8, heads=3, knn=5, query_norm=norm)
    flat = FlatKeyMemory(24, 20, n_slots=100, k_dim=8, heads=3, knn=5, query_norm=norm)
    assert product_memory_cost(24, 20, 10, 8, 3, 5, norm).parameters == n_params(product)
    assert flat_memory_cost(24, 20, 100, 8, 3, 5, norm).parameters == n_params(flat)
    ffn = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24))
    assert ffn_cost(24, 96).parameters == n_params(ffn)


def test_product_search_is_sublinear():
    small = product_memory_cost(256, 256, n_keys=64)
    large = product_memory_cost(256, 256, n_keys=1024)
    flat_small = flat_memory_cost(256, 256, n_slots=64**2)
    flat_large = flat_memory_cost(256, 256, n_slots=1024**2)
    assert flat_large.multiply_adds / flat_small.multiply_adds > 200  # ~ N
    assert large.multiply_adds / small.multiply_adds < 4  # ~ sqrt(N) + k^2
    assert large.value_bytes == small.value_bytes == 4 * 32 * 256 * 4
    assert large.batch_bytes == 4 * 1024 * 128 * 4  # the sub-keys, once per batch


def test_an_ffn_reads_its_weights_per_batch_not_per_token():
    ffn = ffn_cost(24, 96)
    assert ffn.value_bytes == 0 and ffn.batch_bytes == ffn.parameters * 4


def test_speedup_counts_at_most_sqrt_n_candidates_per_half():
    assert product_vs_flat_speedup(1024**2) == pytest.approx(1024**2 * 128 / (1024 * 128 + 1024))
    # knn = 32 > sqrt(64) = 8: each half offers its 8 sub-keys, 64 candidate sums.
    assert product_vs_flat_speedup(64, 128, 32) == pytest.approx(64 * 128 / (8 * 128 + 64))
    with pytest.raises(ValueError, match="knn must be >= 1, got 0"):
        product_vs_flat_speedup(16, 128, 0)
    with pytest.raises(ValueError, match=r"knn must be <= the number of slots n_slots \(16\)"):
        product_vs_flat_speedup(16, 128, 17)
    with pytest.raises(ValueError, match="n_slots must be >= 1, got 0"):
        product_vs_flat_speedup(0)


def test_active_parameters_are_a_sliver_of_a_large_memory():
    cost = product_memory_cost(256, 256, n_keys=512)
    assert cost.parameters == n_params(ProductKeyMemory(256, 256, n_keys=512))
    assert cost.active_parameters < cost.parameters / 50


def test_a_sharded_read_sends_pairs_and_partial_sums():
    """Per rank and step: the plan, 12 bytes per remote pair and one partial sum of D floats per
    token of each other rank forward; the partial sums' gradients and 4 bytes per pair back."""
    traffic = sharded_read_bytes(tokens=10, reads=8, output_dim=16, world_size=4)
    remote = 10 * 8 * 3 / 4  # reads spread evenly: 3 in 4 live elsewhere
    assert traffic.forward == 2 * 3 * 8 + remote * 12 + 3 * 10 * 16 * 4
    assert traffic.backward == remote * 4 + 3 * 10 * 16 * 4
    assert traffic.total == traffic.forward + traffic.backward
    assert sharded_read_bytes(10, 8, 16, world_size=1).total == 0  # nothing leaves one process


def test_sharding_pays_off_when_the_table_has_more_rows_than_a_step_has_tokens():
    """The sharded read against the all-reduce of a replicated table's dense gradient: about
    (W*T + 2*J*T/D) / N, so below 1 once N > W*T; the paper's table at the gpu profile's step
    (262,144 rows, 16,384 tokens over 8 ranks) sends ~15 times less."""
    world, dim, reads = 8, 512, 4 * 32
    tokens = 64 * 256 // world  # per rank
    for n_rows, low, high in [(512**2, 13, 17), (world * tokens, 0.9, 1.1)]:
        replicated = all_reduce_bytes(n_rows * dim, world)
        ratio = replicated / sharded_read_bytes(tokens, reads, dim, world).total
        assert low < ratio < high
    assert all_reduce_bytes(1000, 2) == 1000 * 4  # ring: half out in each of two phases
