"""Analytic cost model: multiply-adds, parameters and bytes per token.

Taught in ``notebooks/06_complexity_and_speed.ipynb`` and used by ``pkm_ref.bench``.

Per token (one query per head), with H heads, k = knn, d = k_dim, N slots, n = sqrt(N) sub-keys:

    query network       input_dim * H * d                 multiply-adds
    flat-key scoring    H * N * d                         multiply-adds, top-k over H * N scores
    product-key scoring H * 2 * n * d/2 = H * n * d       multiply-adds, top-k over H * (2n + k^2)
    value read          H * k * output_dim                multiply-adds, H * k rows read
    dense FFN           2 * input_dim * hidden            multiply-adds

The product-key counts are the paper's search (all k^2 candidate sums); ``product_topk``'s default
fast path scores only the ~k*ln(k) candidates of ``pkm_ref.search.staircase`` (119 instead of
1,024 at k = 32). Parameter counts equal those of the real modules (``FlatKeyMemory``,
``ProductKeyMemory``, an FFN of two Linear layers): the notebook checks that. Bytes: ``value_bytes``
is what one token reads on its own (its value rows); ``batch_bytes`` is what a whole batch reads
once, whatever its size (a memory's keys, an FFN's weights).

Communication, per process and training step, with W processes (``sharded_read_bytes``,
``all_reduce_bytes``): a value table split by rows over the processes (``pkm_ref.sharded_values``)
sends, for T tokens per process, J = H * k reads per token and values of D numbers,

    forward   J*T*(W-1)/W pairs (slot + weight) + (W-1)*T partial sums of D numbers
    backward  (W-1)*T partial-sum gradients of D numbers + one number per pair

while a replicated table (data parallelism) all-reduces its dense gradient, N*D numbers: a ring
all-reduce sends 2*(W-1)/W * N*D per process. Sharding sends less once N > W*T (plus ~2*J*T/D).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pkm_ref import _checks
from pkm_ref.query import QUERY_NORMS


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer for one token; ``bytes_*`` assume ``dtype_bytes`` per number."""

    name: str
    multiply_adds: int  # per token
    topk_elements: int  # scores scanned by top-k per token (0 for an FFN)
    parameters: int  # total, equal to sum(p.numel()) of the module
    active_parameters: int  # parameters one token touches
    value_bytes: int  # value rows read per token
    batch_bytes: int  # parameters read once per batch: all keys, or an FFN's weights

    def to_dict(self) -> dict:
        return asdict(self)


def _query_network(
    input_dim: int, k_dim: int, heads: int, query_norm: str | None
) -> tuple[int, int]:
    """(multiply-adds per token, parameters) of Linear + norm."""
    _checks.one_of("query_norm", query_norm, QUERY_NORMS)
    width = heads * k_dim
    norm = {"batchnorm": 2 * width, "layernorm": 2 * k_dim, None: 0}[query_norm]
    return input_dim * width, input_dim * width + width + norm


def flat_memory_cost(
    input_dim: int, output_dim: int, n_slots: int, k_dim: int = 128, heads: int = 4,
    knn: int = 32, query_norm: str | None = "batchnorm", dtype_bytes: int = 4,
) -> LayerCost:  # fmt: skip
    """Per-token cost of ``FlatKeyMemory`` with the same arguments."""
    input_dim, output_dim, n_slots, k_dim, heads = (
        _checks.positive_int(name, value)
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim),
                            ("n_slots", n_slots), ("k_dim", k_dim), ("heads", heads))
    )  # fmt: skip
    knn = _checks.knn_within(knn, n_slots, "the number of slots n_slots")
    query_macs, query_params = _query_network(input_dim, k_dim, heads, query_norm)
    keys = heads * n_slots * k_dim
    read = heads * knn * output_dim
    return LayerCost(
        name="flat keys",
        multiply_adds=query_macs + keys + read,
        topk_elements=heads * n_slots,
        parameters=query_params + keys + n_slots * output_dim,
        active_parameters=query_params + keys + read,
        value_bytes=read * dtype_bytes,
        batch_bytes=keys * dtype_bytes,
    )


def product_memory_cost(
    input_dim: int, output_dim: int, n_keys: int, k_dim: int = 128, heads: int = 4,
    knn: int = 32, query_norm: str | None = "batchnorm", dtype_bytes: int = 4,
) -> LayerCost:  # fmt: skip
    """Per-token cost of ``ProductKeyMemory`` with the same arguments (n_slots = n_keys**2)."""
    input_dim, output_dim, n_keys, heads = (
        _checks.positive_int(name, value)
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim),
                            ("n_keys", n_keys), ("heads", heads))
    )  # fmt: skip
    k_dim = _checks.even_int("k_dim", k_dim)
    n_slots = n_keys * n_keys
    knn = _checks.knn_within(knn, n_slots, "the number of product keys n_keys**2")
    query_macs, query_params = _query_network(input_dim, k_dim, heads, query_norm)
    subkeys = heads * n_keys * k_dim  # 2 halves of n_keys sub-keys of size k_dim / 2
    k_half = min(knn, n_keys)
    candidates = heads * k_half * k_half  # one addition each
    read = heads * knn * output_dim
    return LayerCost(
        name="product keys",
        multiply_adds=query_macs + subkeys + candidates + read,
        topk_elements=heads * (2 * n_keys + k_half * k_half),
        parameters=query_params + subkeys + n_slots * output_dim,
        active_parameters=query_params + subkeys + read,
        value_bytes=read * dtype_bytes,
        batch_bytes=subkeys * dtype_bytes,
    )


def ffn_cost(input_dim: int, hidden_dim: int, dtype_bytes: int = 4) -> LayerCost:
    """Per-token cost of an FFN: Linear(input, hidden) -> activation -> Linear(hidden, input)."""
    input_dim = _checks.positive_int("input_dim", input_dim)
    hidden_dim = _checks.positive_int("hidden_dim", hidden_dim)
    weights = 2 * input_dim * hidden_dim
    params = weights + hidden_dim + input_dim
    return LayerCost(
        name="FFN",
        multiply_adds=weights,
        topk_elements=0,
        parameters=params,
        active_parameters=params,
        value_bytes=0,  # no row is read per token: every token multiplies by all the weights
        batch_bytes=params * dtype_bytes,
    )


def product_vs_flat_speedup(n_slots: int, k_dim: int = 128, knn: int = 32) -> float:
    """Analytic ratio of search work, flat over product: N*d / (sqrt(N)*d + k'^2),
    with k' = min(knn, sqrt(N)) candidates per half (as in ``product_memory_cost``)."""
    n_slots = _checks.positive_int("n_slots", n_slots)
    k_dim = _checks.positive_int("k_dim", k_dim)
    n_keys = math.isqrt(n_slots)
    if n_keys * n_keys != n_slots:
        raise ValueError(f"n_slots must be a perfect square for product keys, got {n_slots}")
    knn = _checks.knn_within(knn, n_slots, "the number of slots n_slots")
    k_half = min(knn, n_keys)
    return (n_slots * k_dim) / (n_keys * k_dim + k_half * k_half)


@dataclass(frozen=True)
class ReadTraffic:
    """Bytes one process sends to the others in one training step of a sharded value read."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def sharded_read_bytes(
    tokens: int, reads: int, output_dim: int, world_size: int, remote_reads: float | None = None,
    dtype_bytes: int = 4, index_bytes: int = 8,
) -> ReadTraffic:  # fmt: skip
    """What ``ShardedValues`` sends from one process per step, every process reading ``tokens``.

    Args:
        tokens: T, tokens (rows of the layer's input) on each process.
        reads: J, slots read per token (heads * knn).
        output_dim: D, numbers per value.
        world_size: W, processes sharing the table.
        remote_reads: reads of this process whose slot lives on another process (and, the same
            number, reads of other processes whose slot lives here). Default: the expected
            J*T*(W-1)/W of slots spread evenly over the processes.
        dtype_bytes: bytes per value number and per weight (4 for float32).
        index_bytes: bytes per slot code and per count (int64: 8).

    Forward: the plan (a pair count and a token count to each other process), every remote
    (slot, weight) pair, and one partial sum of D numbers per token of each other process.
    Backward: the gradients of those partial sums, and of the weights of the pairs received.
    """
    tokens = _checks.nonnegative_int("tokens", tokens)
    reads = _checks.positive_int("reads", reads)
    output_dim = _checks.positive_int("output_dim", output_dim)
    world_size = _checks.positive_int("world_size", world_size)
    others = world_size - 1
    if remote_reads is None:
        remote_reads = reads * tokens * others / world_size
    partial_sums = others * tokens * output_dim * dtype_bytes
    return ReadTraffic(
        forward=round(2 * others * index_bytes + remote_reads * (index_bytes + dtype_bytes))
        + partial_sums,
        backward=round(remote_reads * dtype_bytes) + partial_sums,
    )


def all_reduce_bytes(numbers: int, world_size: int, dtype_bytes: int = 4) -> float:
    """Bytes one process sends in a ring all-reduce of ``numbers`` numbers over ``world_size``
    processes (NCCL's algorithm for large tensors): 2 * (W-1)/W * numbers * dtype_bytes, half in
    the reduce-scatter, half in the all-gather. Data parallelism pays it for every dense gradient,
    a replicated value table's included."""
    numbers = _checks.nonnegative_int("numbers", numbers)
    world_size = _checks.positive_int("world_size", world_size)
    return 2 * (world_size - 1) / world_size * numbers * dtype_bytes
