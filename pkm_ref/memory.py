"""Key-value memory layers: flat keys and product keys.

Taught in ``notebooks/01_flat_key_memory.ipynb`` (flat), ``02_product_keys.ipynb`` (product keys)
and ``04_multihead_memory_gpu.ipynb`` (heads, the shared value table, sparse gradients).

For each input x (the paper's memory design), and each of H heads:

    q_h      = QueryNetwork(x)_h                         query, (k_dim,)
    I_h      = top-knn indices of <q_h, key> over keys   (knn,)
    w_h      = softmax(<q_h, key_i> for i in I_h)         (knn,)
    m(x)     = sum_h sum_{i in I_h} w_h[i] * values[i]   (output_dim,)

All heads read ONE value table and their reads are summed: one bag of H * knn weighted rows per
input, read by ``pkm_ref.read.read_bags``. The table is an ``EmbeddingBag``'s weight (mode "sum",
per-sample weights), read by its kernel by default; with ``sparse=True`` its gradient touches only
the rows that were read. ``compiled_read=True`` reads with ``gather_sum`` fused by
``torch.compile`` instead: about twice the bandwidth of EmbeddingBag on an H200, slower on CPU
(``python -m pkm_ref bench retrieval`` measures both). ``value_dtype=torch.bfloat16`` stores the
table in bfloat16: half the bytes per read, sums and output still in float32.
``pkm_ref.sharded_values.shard_values(memory)`` splits the table by rows over the processes of a
``torch.distributed`` group; each row is then read on the process that holds it.

``kernels`` picks the code that runs the search and the read (``KERNELS``):

* ``"torch"``: the fast torch search (``product_topk(method="fast")``), then the EmbeddingBag read,
  or the compiled one with ``compiled_read=True``;
* ``"triton"``: the fused search of ``pkm_ref.search_triton`` and the read of
  ``pkm_ref.read_triton`` (CUDA tensors; CPU ones only under Triton's interpreter, for tests);
* ``"auto"`` (the default): Triton for CUDA inputs when triton imports (compiled, not
  interpreted) and the query is float32, bfloat16 or float16; torch otherwise, on CPU always (even
  under ``TRITON_INTERPRET=1``, which is for tests). Decided on every forward from the input's
  device, so a layer moved between CPU and GPU keeps working.

Kernels change the speed, not the results: every path finds the same slots and the same sums, up
to rounding (summation order; a bfloat16 table's rows are weighed and summed in float32 by Triton
and by the compiled read, in bfloat16 by EmbeddingBag) and to how exact ties are broken. The flat
layer's search has no Triton path: there ``kernels`` picks the read only. ``compiled_read=True``
is a choice among the torch reads: with it ``"auto"`` resolves to torch everywhere, and
``"triton"`` refuses it. A sharded table is read on its owners by EmbeddingBag: there ``kernels``
picks the search only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pkm_ref import _checks, _triton
from pkm_ref.query import QueryNetwork
from pkm_ref.read import read_bags
from pkm_ref.search import flat_topk, product_topk
from pkm_ref.sharded_values import ShardedValues

# Value tables: float32, or bfloat16 for half the bytes of every read (see ``pkm_ref.optim`` for
# how SplitOptimizer trains a bfloat16 table through a float32 master copy).
VALUE_DTYPES = (torch.float32, torch.bfloat16)

# Who runs the search and the read (see the module docstring).
KERNELS = ("auto", "torch", "triton")


class _KeyValueMemory(nn.Module):
    """What flat- and product-key memories share: query network, value table, forward pass.

    Subclasses own the keys and implement ``_search(query, triton) -> (scores, indices)`` for a
    query of shape (N, H, k_dim), returning two (N, H, knn) tensors; ``triton`` asks for the Triton
    search where the subclass has one.
    """

    n_slots: int

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        n_slots: int,
        k_dim: int,
        heads: int,
        knn: int,
        query_norm: str | None,
        input_dropout: float,
        query_dropout: float,
        value_dropout: float,
        sparse: bool,
        compiled_read: bool,
        value_dtype: torch.dtype,
        kernels: str,
    ):
        super().__init__()
        if sparse and compiled_read:
            raise ValueError(
                "compiled_read=True gives the value table a dense gradient; it cannot be combined "
                "with sparse=True"
            )
        self.kernels = _checks.one_of("kernels", kernels, KERNELS)
        if compiled_read and kernels == "triton":
            raise ValueError(
                'compiled_read=True picks the torch.compile read, kernels="triton" the Triton one: '
                'use compiled_read=False with kernels="triton", or kernels="torch" (or "auto")'
            )
        self.input_dim = _checks.positive_int("input_dim", input_dim)
        self.output_dim = _checks.positive_int("output_dim", output_dim)
        self.k_dim = _checks.positive_int("k_dim", k_dim)
        self.heads = _checks.positive_int("heads", heads)
        self.knn = _checks.knn_within(knn, n_slots, "the number of slots n_slots")
        self.n_slots = n_slots
        self.sparse = bool(sparse)
        self.compiled_read = bool(compiled_read)
        self.input_dropout = _checks.probability("input_dropout", input_dropout)
        self.query_dropout = _checks.probability("query_dropout", query_dropout)
        self.value_dropout = _checks.probability("value_dropout", value_dropout)
        _checks.one_of("value_dtype", value_dtype, VALUE_DTYPES)
        self.query = QueryNetwork(self.input_dim, self.k_dim, self.heads, query_norm)
        self.values = nn.EmbeddingBag(n_slots, self.output_dim, mode="sum", sparse=self.sparse)
        # N(0, 1/output_dim): a read of knn rows starts at a sensible scale. Never zero: zero
        # values would give the keys and queries no gradient at step 0.
        nn.init.normal_(self.values.weight, mean=0.0, std=self.output_dim**-0.5)
        # Drawn in float32 then rounded: with one seed a bfloat16 table is the float32 one rounded.
        self.values.to(value_dtype)
        # Usage recording (eval mode only): see ``record_usage``.
        self.record_usage = False
        self.last_indices: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def _search(self, query: torch.Tensor, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Read the memory.

        Args:
            x: (..., input_dim) input, any leading shape.
            mask: bool tensor of the leading shape ``x.shape[:-1]``, True for real positions, or
                None. Masked positions are kept out of batchnorm statistics and usage records;
                their outputs are computed but meaningless.

        Returns:
            (..., output_dim). When ``record_usage`` is True and the module is in eval mode,
            ``last_indices`` and ``last_weights`` hold the (N_real, H, knn) slots read and their
            softmax weights for the real positions of this call.
        """
        layer = f"the {type(self).__name__}'s parameters"  # x must match them, or use autocast
        _checks.same_dtype("x", _checks.tensor("x", x), layer, self.query.proj.weight)
        if x.dim() < 1 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"x must have shape (..., input_dim={self.input_dim}), got {tuple(x.shape)}"
            )
        lead_shape = x.shape[:-1]
        flat_mask = None
        if mask is not None:
            _checks.tensor("mask", mask)
            if mask.shape != lead_shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(lead_shape)} (x without its last "
                    f"dimension), got {mask.dtype} {tuple(mask.shape)}"
                )
            flat_mask = mask.reshape(-1)  # (N,)

        inputs = x.reshape(-1, self.input_dim)  # (N, input_dim): batchnorm over (N, C), never time
        inputs = F.dropout(inputs, self.input_dropout, self.training)  # (N, input_dim)
        query = self.query(inputs, flat_mask)  # (N, H, k_dim)
        query = F.dropout(query, self.query_dropout, self.training)  # (N, H, k_dim)
        triton = _runs_triton(  # decided per call: the layer may have moved to another device
            self.kernels, self.compiled_read, query.device, query.dtype, type(self).__name__
        )
        scores, indices = self._search(query, triton)  # (N, H, knn) each
        # Softmax in at least float32 even under reduced precision, and no rounding back to the
        # scores' 16 bits: the weights reach the value read as they were computed.
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
        weights = F.softmax(scores, dim=-1, dtype=softmax_dtype)  # (N, H, knn)
        n_rows, reads = indices.shape[0], self.heads * self.knn  # reads named: N may be 0
        # Sum over heads and knn: the heads share one table.
        bags = indices.reshape(n_rows, reads)  # (N, H * knn)
        bag_weights = weights.reshape(n_rows, reads)  # (N, H * knn), float32 even for bf16 values
        if isinstance(self.values, ShardedValues):  # rows read where they live: shard_values
            out = self.values(bags, bag_weights)  # (N, output_dim)
        else:
            method = "triton" if triton else "compiled" if self.compiled_read else "embedding_bag"
            out = read_bags(  # (N, output_dim), float32 for float32 and bfloat16 tables
                self.values.weight, bags, bag_weights, method, self.sparse
            )
        out = F.dropout(out, self.value_dropout, self.training)  # (N, output_dim)

        if self.record_usage and not self.training:
            keep = slice(None) if flat_mask is None else flat_mask
            self.last_indices = indices[keep].detach()  # (N_real, H, knn)
            self.last_weights = weights[keep].detach()  # (N_real, H, knn)
        return out.view(*lead_shape, self.output_dim)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, n_slots={self.n_slots}, "
            f"k_dim={self.k_dim}, heads={self.heads}, knn={self.knn}, "
            f"query_norm={self.query.norm_kind!r}, sparse={self.sparse}, kernels={self.kernels!r}"
            + (", compiled_read=True" if self.compiled_read else "")
            + (f", value_dtype={self.value_dtype}" if self.value_dtype != torch.float32 else "")
        )

    @property
    def value_dtype(self) -> torch.dtype:
        """The value table's dtype (float32, or bfloat16: see ``VALUE_DTYPES``)."""
        return self.values.weight.dtype


def _runs_triton(
    kernels: str, compiled_read: bool, device: torch.device, dtype: torch.dtype, layer: str
) -> bool:
    """Whether a forward of a ``layer`` (its class name) with these ``kernels`` and
    ``compiled_read`` runs the Triton kernels, for a query of ``dtype`` on ``device``.

    ``"triton"`` on a device where the kernels cannot run raises, naming the layer and what to
    choose instead. ``"auto"`` asks on every forward, so it stays cheap: whether triton imports is
    asked once per process (``_triton.available``).
    """
    if kernels == "torch":
        return False
    if kernels == "triton":
        caller = f'{layer}(kernels="triton")'
        read_kernels = _triton.import_kernels("read_triton", caller, 'kernels="torch"')
        instead = 'kernels="auto" (torch where Triton cannot run) or "torch"'
        _triton.check_runnable(device, read_kernels.INTERPRETED, caller, instead)
        return True
    if device.type != "cuda" or compiled_read or not _triton.available():
        return False
    from pkm_ref import search_triton  # imported by ``available`` already: a lookup

    # Compiled kernels only: the interpreter (TRITON_INTERPRET=1) is for tests, not for speed.
    return not search_triton.INTERPRETED and dtype in search_triton.SCORE_DTYPES


class FlatKeyMemory(_KeyValueMemory):
    """A memory layer whose keys are searched exhaustively: O(n_slots * k_dim) per query.

    The baseline that product keys beat. Each head has its own (n_slots, k_dim) keys; all heads
    share one (n_slots, output_dim) value table. The arguments are ``ProductKeyMemory``'s, with
    ``n_slots`` for ``n_keys``; ``kernels`` picks the value read only, since the exhaustive search
    has no Triton path (it is one matmul and a top-k per block of keys, in torch).

    ``forward(x, mask=None)``: (..., input_dim) -> (..., output_dim).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        n_slots: int,
        k_dim: int = 128,
        heads: int = 4,
        knn: int = 32,
        query_norm: str | None = "batchnorm",
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        sparse: bool = False,
        compiled_read: bool = False,
        value_dtype: torch.dtype = torch.float32,
        kernels: str = "auto",
    ):
        n_slots = _checks.positive_int("n_slots", n_slots)
        super().__init__(
            input_dim, output_dim, n_slots, k_dim, heads, knn, query_norm, input_dropout,
            query_dropout, value_dropout, sparse, compiled_read, value_dtype, kernels,
        )  # fmt: skip
        bound = 1.0 / math.sqrt(k_dim)
        self.keys = nn.Parameter(torch.empty(heads, n_slots, k_dim).uniform_(-bound, bound))

    def _search(self, query: torch.Tensor, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return flat_topk(query, self.keys, self.knn)  # (N, H, knn) each; no Triton search


class ProductKeyMemory(_KeyValueMemory):
    """The product-key memory layer (Lample et al. 2019): n_keys**2 slots, sub-linear search.

    Each head has two sets of ``n_keys`` sub-keys of dimension ``k_dim // 2``; slot
    ``i1 * n_keys + i2`` has the key ``[subkeys[h, 0, i1], subkeys[h, 1, i2]]``. The search costs
    O((n_keys + knn**2) * k_dim) per query and head instead of O(n_keys**2 * k_dim). All heads share
    one (n_slots, output_dim) value table.

    ``forward(x, mask=None)``: (..., input_dim) -> (..., output_dim).

    Args:
        input_dim: size of the input features.
        output_dim: size of a value (and of the output).
        n_keys: sub-keys per half; the memory has ``n_slots = n_keys ** 2`` slots.
        k_dim: query and key size; must be even.
        heads: number of heads, each with its own query and sub-keys.
        knn: slots read per head, at most ``n_slots``.
        query_norm: "batchnorm" (paper), "layernorm" or None.
        input_dropout, query_dropout, value_dropout: dropout on the input, the query, the read.
        sparse: give the value table sparse gradients (use ``SparseAdam``; see ``pkm_ref.optim``).
        compiled_read: read the values with ``gather_sum`` under ``torch.compile`` instead of the
            EmbeddingBag (faster on GPU; dense gradients, so not with ``sparse``).
        value_dtype: the value table's dtype, ``torch.float32`` or ``torch.bfloat16`` (half the
            bytes per read; ``SplitOptimizer`` trains it through a float32 master copy).
        kernels: who runs the search and the read, ``"auto"`` (Triton on CUDA when it imports,
            else torch), ``"torch"`` or ``"triton"``: speed only, the same results up to rounding
            (see the module docstring).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        n_keys: int = 512,
        k_dim: int = 128,
        heads: int = 4,
        knn: int = 32,
        query_norm: str | None = "batchnorm",
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        sparse: bool = False,
        compiled_read: bool = False,
        value_dtype: torch.dtype = torch.float32,
        kernels: str = "auto",
    ):
        n_keys = _checks.positive_int("n_keys", n_keys)
        k_dim = _checks.even_int("k_dim", k_dim)
        super().__init__(
            input_dim, output_dim, n_keys * n_keys, k_dim, heads, knn, query_norm, input_dropout,
            query_dropout, value_dropout, sparse, compiled_read, value_dtype, kernels,
        )  # fmt: skip
        self.n_keys = n_keys
        half = k_dim // 2
        bound = 1.0 / math.sqrt(half)
        self.subkeys = nn.Parameter(torch.empty(heads, 2, n_keys, half).uniform_(-bound, bound))

    def _search(self, query: torch.Tensor, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
        method = "triton" if triton else "fast"
        return product_topk(query, self.subkeys, self.knn, method)  # (N, H, knn) each

    def extra_repr(self) -> str:
        return f"n_keys={self.n_keys}, " + super().extra_repr()
