"""A value table split by rows over two processes (gloo, CPU) reads and learns like the whole one.

The two processes start once for the module (``two_ranks``): starting them costs seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_on_ranks

from pkm_ref import ProductKeyMemory
from pkm_ref.cost import sharded_read_bytes
from pkm_ref.sharded_values import ShardedValues, shard_values

N_ROWS, DIM, READS = 11, 4, 6  # 11 rows: rank 0 owns 6, rank 1 owns 5
TOKENS = (5, 3)  # per rank: the ranks need not hold as many tokens


def _read(sparse: bool) -> dict:
    """A sharded read and the replicated one, on this rank's tokens, and their gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    table = torch.randn(N_ROWS, DIM, generator=torch.Generator().manual_seed(0))  # every rank's
    draw = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens
    indices = torch.randint(N_ROWS, (TOKENS[rank], READS), generator=draw)  # (B, J)
    weights = torch.rand(TOKENS[rank], READS, generator=draw)  # (B, J)
    out_grad = torch.randn(TOKENS[rank], DIM, generator=draw)  # (B, D)

    sharded = ShardedValues(table, sparse=sparse)
    sharded_weights = weights.clone().requires_grad_()
    out = sharded(indices, sharded_weights)  # (B, D)
    (out * out_grad).sum().backward()

    whole = table.clone().requires_grad_()
    whole_weights = weights.clone().requires_grad_()
    expected = F.embedding_bag(indices, whole, per_sample_weights=whole_weights, mode="sum")
    (expected * out_grad).sum().backward()
    table_grad = whole.grad.clone()
    dist.all_reduce(table_grad)  # the owner gets every rank's contribution to its rows
    grad = sharded.weight.grad
    return {
        "out": (out, expected),
        "weight_grad": (sharded_weights.grad, whole_weights.grad),
        "table_grad": (grad.to_dense() if sparse else grad, table_grad[rank::world]),
        "sparse_grad": grad.is_sparse,
        "local_rows": sharded.weight.shape[0],
    }


def _traffic() -> dict:
    """Bytes this rank sends to the other in a forward and a backward pass, counted at every
    all_to_all_single, for reads of which exactly half live on the other rank."""
    rank = dist.get_rank()
    n_tokens, reads, dim = 6, 4, 8
    table = torch.randn(64, dim, generator=torch.Generator().manual_seed(0))
    sharded = ShardedValues(table)
    slots = torch.arange(n_tokens * reads).view(n_tokens, reads) + 7 * rank  # owners alternate
    weights = torch.rand(n_tokens, reads).requires_grad_()
    sent = {"forward": 0, "backward": 0}
    phase = "forward"
    send = dist.all_to_all_single

    def counting(output, input, output_split_sizes, input_split_sizes, group=None):
        row_bytes = input[:1].numel() * input.element_size()
        others = sum(n for r, n in enumerate(input_split_sizes) if r != rank)
        sent[phase] += others * row_bytes
        return send(output, input, output_split_sizes, input_split_sizes, group=group)

    dist.all_to_all_single = counting
    try:
        out = sharded(slots, weights)  # (6, 8)
        phase = "backward"
        out.sum().backward()
    finally:
        dist.all_to_all_single = send
    expected = sharded_read_bytes(n_tokens, reads, dim, 2, remote_reads=n_tokens * reads / 2)
    return {"sent": sent, "expected": {"forward": expected.forward, "backward": expected.backward}}


def _memory_layer(value_dtype: torch.dtype) -> dict:
    """A product-key memory with sharded values against its replicated copy, on this rank's
    inputs: outputs, and the gradients of every parameter."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same layer on every rank
    memory = ProductKeyMemory(8, 8, n_keys=4, k_dim=8, heads=2, knn=3, value_dtype=value_dtype)
    replicated = copy.deepcopy(memory)
    shard_values(memory)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(10 + rank))  # (B, T, C)
    out, expected = memory(x), replicated(x)  # (2, 5, 8) each
    out.square().sum().backward()
    expected.square().sum().backward()
    table_grad = replicated.values.weight.grad.clone()
    dist.all_reduce(table_grad)
    grads = {
        name: (param.grad, dict(replicated.named_parameters())[name].grad)
        for name, param in memory.named_parameters()
        if name != "values.weight"
    }
    return {
        "out": (out, expected),
        "grads": grads,
        "table_grad": (memory.values.weight.grad, table_grad[rank::world]),
    }


def _every_check() -> dict:
    return {
        "dense": _read(sparse=False),
        "sparse": _read(sparse=True),
        "traffic": _traffic(),
        "memory float32": _memory_layer(torch.float32),
        "memory bfloat16": _memory_layer(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_every_check, 2)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_sharded_read_equals_the_whole_table_read(two_ranks: list[dict], kind: str) -> None:
    """Outputs and weight gradients as the whole table gives them; each owner's rows get the sum
    of every rank's gradient (sparse ones stay sparse); up to the order of float sums."""
    for rank, result in enumerate(ranks[kind] for ranks in two_ranks):
        for name in ("out", "weight_grad", "table_grad"):
            torch.testing.assert_close(*result[name], rtol=1e-6, atol=1e-6, msg=name)
        assert result["sparse_grad"] == (kind == "sparse")
        assert result["local_rows"] == len(range(rank, N_ROWS, 2))  # memory per rank: 1/W


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sharded_memory_layer_equals_the_replicated_one(two_ranks: list[dict], dtype) -> None:
    """shard_values(memory): the same outputs and parameter gradients as the replicated layer;
    a bfloat16 table's output in float32 too, equal up to bfloat16 rounding (each owner rounds
    its partial sum, EmbeddingBag the whole one)."""
    tolerance = {"float32": 1e-6, "bfloat16": 2e-2}[dtype]
    for result in (ranks[f"memory {dtype}"] for ranks in two_ranks):
        assert result["out"][0].dtype == result["out"][1].dtype == torch.float32
        torch.testing.assert_close(*result["out"], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(*result["table_grad"], rtol=tolerance, atol=tolerance)
        for name, (grad, expected) in result["grads"].items():
            torch.testing.assert_close(
                grad, expected, rtol=10 * tolerance, atol=tolerance, msg=name
            )


def test_a_sharded_read_sends_what_the_cost_model_says(two_ranks: list[dict]) -> None:
    """The bytes sent to the other rank, counted at each all_to_all_single, equal
    ``cost.sharded_read_bytes``, forward and backward."""
    for result in (ranks["traffic"] for ranks in two_ranks):
        assert result["sent"] == result["expected"]
        assert result["sent"]["forward"] > 0 and result["sent"]["backward"] > 0


def test_sharding_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="initialise it first"):
        ShardedValues(torch.zeros(4, 2))


def test_shard_values_refuses_the_compiled_read() -> None:
    memory = ProductKeyMemory(8, 8, n_keys=4, k_dim=8, heads=2, knn=3, compiled_read=True)
    with pytest.raises(ValueError, match="compiled_read=False"):
        shard_values(memory)
