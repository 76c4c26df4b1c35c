"""A memory's value table split by rows over the processes of a ``torch.distributed`` group.

Not taught in a notebook (a notebook is one process): see the README's "More than one GPU".

Data parallelism copies the whole value table to every process, and the table is most of a memory
model's parameters (at the paper's size 262,144 x 512 floats: 512 MiB, 2 GiB with its gradient and
Adam's two states). Here rank r of W keeps only the rows ``i`` with ``i % W == r`` (its local row
``i // W``): 1/W of the table, of its gradient and of its optimizer states per process.
Consecutive slots go to different ranks, so the reads of a step spread over them evenly.

**Routing.** A read is, per token t, ``out[t] = sum_j w[t, j] * values[i[t, j]]`` over the J = H
* knn slots the token selected. Each rank holds its own tokens (data parallelism) and:

1. sends every (slot, weight) pair to the slot's owner (``collectives.exchange``, an
   ``all_to_all_single``; the slot and the token it belongs to travel as one int64);
2. each owner sums, per source token, the weighted rows it owns (``F.embedding_bag``);
3. each owner sends every source rank one partial sum per token of that rank (zeros where it
   owns no slot of the token), and the source adds up the W partial sums of each token.

The rows themselves never travel: a token costs J pairs out and W partial sums of D floats back,
not J rows of D. The backward pass runs the same exchanges reversed (autograd through
``exchange``): the gradients of the partial sums go to the owners, which accumulate their rows'
gradients locally (dense, or row-sparse with ``sparse=True``), and the gradients of the weights
come back to the tokens. An owner's gradient is the sum over the ranks of the gradients of their
losses (no further all-reduce: no other rank holds these rows).

**What travels** per rank and step, for T tokens per rank, J reads per token and D-float values
(``pkm_ref.cost.sharded_read_bytes``; a test counts the bytes sent against it): forward
J * T * (W-1)/W pairs of 12 bytes (an int64 and a float32) plus (W-1) * T partial sums of 4D
bytes; backward the same (W-1) * T * 4D bytes plus 4 bytes per pair. Against it, data parallelism
all-reduces the dense table gradient: a ring all-reduce sends 2 (W-1)/W * N * 4D bytes per rank
(``cost.all_reduce_bytes``). So, neglecting the pairs (J/D is small), the sharded read sends less
as soon as the table has more rows than a step has tokens over all ranks, N > W * T, and holds 1/W
of the table's memory at any size. The paper's memory (N = 512² = 262,144 rows) against the gpu
profile's step (64 x 256 = 16,384 tokens over all ranks) sends about 15 times less. A small table
read by a large batch (N < W * T) is cheaper replicated.

Every rank of the group must run each forward and backward pass of the layer together, even with
no token to read. The sizes of each exchange are read on the host (all_to_all_single takes them as
lists): two synchronisations per forward pass on a GPU. ``pkm_ref.SplitOptimizer`` trains the local
rows (Adam or SparseAdam) and clips their gradient by its own norm, not the norm over all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pkm_ref.collectives import exchange
from pkm_ref.read import sum_dtype


class ShardedValues(nn.Module):
    """The rows ``rank::world_size`` of an (n_rows, dim) value table, read across the group.

    ``forward(indices (B, J), weights (B, J)) -> (B, dim)``: ``out[b] = sum_j weights[b, j] *
    table[indices[b, j]]`` for the whole table, with each row read on the rank that owns it (see
    the module docstring), in ``read.sum_dtype`` as ``read.read_bags`` returns it (float32 for a
    bfloat16 table). A collective: every rank of ``group`` calls it, each with its own B.

    ``weight``: a parameter, the rows ``table[rank::W]`` (ceil((n_rows - rank) / W), dim) copied
    from ``table`` (n_rows, dim): every rank must pass the same table (the same seed), since each
    keeps its own rows of it. ``sparse``: a row-sparse gradient for ``weight`` (use SparseAdam).
    ``group``: the ``torch.distributed`` process group (None: all processes).
    """

    def __init__(self, table: torch.Tensor, sparse: bool = False, group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedValues splits a table over the processes of torch.distributed: "
                "initialise it first (torchrun and dist.init_process_group do)"
            )
        if table.dim() != 2:
            raise ValueError(f"table must be (n_rows, dim), got shape {tuple(table.shape)}")
        self.group, self.sparse = group, bool(sparse)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.n_rows, self.dim = table.shape
        rows = table.detach()[self.rank :: self.world_size]  # (n_local, dim)
        self.weight = nn.Parameter(rows.clone())

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, reads = indices.shape
        world, device = self.world_size, self.weight.device
        owner = (indices % world).reshape(-1)  # (B*J,) rank that holds each slot
        token = torch.arange(n_tokens, device=device).repeat_interleave(reads)  # (B*J,)
        # One int64 per pair: the owner's local row and the token, decoded by the owner.
        code = (indices.reshape(-1) // world) * n_tokens + token  # (B*J,)
        order = torch.argsort(owner, stable=True)  # (B*J,) grouped by owner, tokens in order
        sends = torch.bincount(owner, minlength=world)  # (W,) pairs for each owner
        # Each owner learns how many pairs it gets from each rank, and from how many tokens.
        plan = torch.stack([sends, torch.full_like(sends, n_tokens)], dim=1)  # (W, 2)
        received = exchange(plan, [1] * world, [1] * world, self.group)  # (W, 2) per source
        send_counts = sends.tolist()
        receive_counts, source_tokens = received.T.tolist()
        codes = exchange(code[order], send_counts, receive_counts, self.group)  # (P,)
        pair_weights = exchange(  # (P,) differentiable
            weights.reshape(-1)[order], send_counts, receive_counts, self.group
        )
        partial = self._partial_sums(codes, pair_weights, receive_counts, source_tokens)
        # Back to each source: one partial sum per token of it; this rank gets W per token.
        back = exchange(partial, source_tokens, [n_tokens] * world, self.group)  # (W*B, dim)
        return back.view(world, n_tokens, self.dim).sum(dim=0)  # (B, dim)

    def _partial_sums(
        self,
        codes: torch.Tensor,
        pair_weights: torch.Tensor,
        receive_counts: list[int],
        source_tokens: list[int],
    ) -> torch.Tensor:
        """Per token of every source rank, the weighted sum of the local rows it reads.

        codes, pair_weights: (P,) the pairs received, grouped by source, each source's pairs in
        token order. Returns (sum(source_tokens), dim): source 0's tokens, then source 1's...
        """
        device = codes.device
        counts = torch.tensor(receive_counts, device=device)  # (W,)
        tokens = torch.tensor(source_tokens, device=device)  # (W,)
        source = torch.repeat_interleave(torch.arange(self.world_size, device=device), counts)
        per_pair_tokens = tokens[source]  # (P,) tokens of each pair's source
        rows = codes // per_pair_tokens  # (P,) local rows
        first_bag = torch.cumsum(tokens, dim=0) - tokens  # (W,) where each source's bags start
        bag = first_bag[source] + codes % per_pair_tokens  # (P,) non-decreasing
        bag_sizes = torch.bincount(bag, minlength=sum(source_tokens))  # (M,)
        offsets = torch.cumsum(bag_sizes, dim=0) - bag_sizes  # (M,) start of each bag
        partial = F.embedding_bag(  # (M, dim); an empty bag (no slot of that token here) is 0
            rows, self.weight, offsets, mode="sum",
            per_sample_weights=pair_weights.to(self.weight.dtype), sparse=self.sparse,
        )  # fmt: skip
        # Sent on in at least float32, as read_bags returns it (a bfloat16 table included).
        return partial.to(sum_dtype(self.weight, pair_weights))  # (M, dim)

    def extra_repr(self) -> str:
        return (
            f"n_rows={self.n_rows}, dim={self.dim}, rank={self.rank}, "
            f"world_size={self.world_size}, local_rows={self.weight.shape[0]}, "
            f"sparse={self.sparse}"
        )


def shard_values(memory: nn.Module, group=None) -> nn.Module:
    """Split the value table of ``memory`` (a ``ProductKeyMemory`` or ``FlatKeyMemory``) over the
    ranks of ``group``: each keeps its rows (``ShardedValues``) and reads the others' through
    them. Returns ``memory``, changed in place.

    Every rank must have built the same memory (the same seed), since each keeps its own rows of
    its table. Not with ``compiled_read``: the owners read with EmbeddingBag.
    """
    if getattr(memory, "compiled_read", False):
        raise ValueError(
            "shard_values reads the owned rows with EmbeddingBag; build the memory with "
            "compiled_read=False"
        )
    if isinstance(memory.values, ShardedValues):
        raise ValueError("this memory's values are sharded already")
    memory.values = ShardedValues(memory.values.weight, memory.sparse, group)
    return memory
