"""The optimizer split: memory values learn on their own schedule.

Taught in ``notebooks/04_multihead_memory_gpu.ipynb``.

Each step updates only the few value rows that were read, so the values see far fewer updates than
the rest of the network. The paper (§4.3) trains them with a higher Adam rate than the rest,
1e-3 against 2.5e-4; the authors' code (XLM) gives them an Adam of their own at a constant 1e-3,
while the dense parameters use their own rate and schedule. With ``sparse=True`` value tables
produce sparse gradients, which only ``SparseAdam`` accepts; dense value tables use ``Adam``. A
value table never appears in the dense group.

**bfloat16 value tables** (``value_dtype=torch.bfloat16``) are trained through a float32 master
copy: the value optimizer (Adam or SparseAdam, with float32 states) updates the master, and after
each step the master, rounded to the nearest bfloat16, is written back into the table that the
forward pass reads. The table exists in bfloat16 to halve the bytes of every read, which is all
the speed asks; the update needs more bits. The value learning rate is a constant (the paper's
1e-3), an Adam step moves a value by about the rate at most, and bfloat16 keeps 8 significant
bits: around 0.1 (values start at N(0, 1/d)) its spacing is 2^-11 ≈ 5e-4, at 1.0 it is
2^-7 ≈ 8e-3. Adam applied to the bfloat16 table itself would round many such steps away, and a
value read only now and then (most rows) would stop learning. The master keeps every step; reads
still see bfloat16. The cost is memory: 4 more bytes per value next to the 8 of Adam's two states
(2 + 4 + 8 = 14 bytes per value, against 12 for a float32 table). The public code of Memory Layers
at Scale (Berges et al. 2024, facebookresearch/memory, lingua/product_key/colwise_embedding_bag.py
and lingua/optim.py) creates its value table as a bfloat16 parameter and hands it to a plain
AdamW: bfloat16 weights and states, no master. We keep the master, so that a bfloat16 table
changes only the read, and the quality cost against float32 measures the read's rounding alone.
"""

from __future__ import annotations

import torch
from torch import nn

from pkm_ref.memory import _KeyValueMemory

# Value tables stored in fewer than 32 bits: trained through a float32 master copy.
_MASTERED_DTYPES = (torch.bfloat16, torch.float16)


def value_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The value tables (``values.weight``) of every memory layer inside ``module``."""
    return [m.values.weight for m in module.modules() if isinstance(m, _KeyValueMemory)]


class SplitOptimizer:
    """One optimizer for the dense parameters, and separate ones for the memory value tables.

    ``dense``: ``torch.optim.AdamW`` over every parameter that is not a value table (its learning
    rate is yours to schedule). ``values``: ``Adam`` over the dense-gradient value tables, and
    ``sparse_values``: ``SparseAdam`` over the sparse ones, both at a constant ``value_lr``.
    Either value optimizer is None when there is no such table. A bfloat16 table is trained through
    its float32 master copy (see the module docstring): the value optimizers hold the master, which
    takes over the table's gradient in ``clip_grad_norm_`` or ``step`` and is written back into
    the table, rounded, after every step; ``masters`` lists the (table, master) pairs.

    Use it like a torch optimizer: ``zero_grad()``, ``clip_grad_norm_()``, ``step()``,
    ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        value_lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
    ):
        for name, rate in (("lr", lr), ("value_lr", value_lr)):
            if not rate > 0:
                raise ValueError(f"{name} must be > 0, got {rate}")
        memories = [m for m in model.modules() if isinstance(m, _KeyValueMemory)]
        # (table, float32 master) of every table stored in fewer bits.
        self.masters: list[tuple[nn.Parameter, torch.Tensor]] = [
            (m.values.weight, m.values.weight.detach().float())
            for m in memories
            if m.values.weight.dtype in _MASTERED_DTYPES
        ]
        master_of = {id(table): master for table, master in self.masters}

        def trained(memory: _KeyValueMemory) -> torch.Tensor:  # what a step updates
            return master_of.get(id(memory.values.weight), memory.values.weight)

        sparse_tables = [trained(m) for m in memories if m.sparse]
        dense_tables = [trained(m) for m in memories if not m.sparse]
        value_ids = {id(m.values.weight) for m in memories}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
        self.dense = torch.optim.AdamW(dense, lr=lr, betas=betas, weight_decay=weight_decay)
        self.values = torch.optim.Adam(dense_tables, lr=value_lr) if dense_tables else None
        self.sparse_values = (
            torch.optim.SparseAdam(sparse_tables, lr=value_lr) if sparse_tables else None
        )

    def _named(self) -> list[tuple[str, torch.optim.Optimizer | None]]:
        return [
            ("dense", self.dense),
            ("values", self.values),
            ("sparse_values", self.sparse_values),
        ]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for _, optimizer in self._named() if optimizer is not None]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for table, _ in self.masters:  # in no optimizer: their masters are
            table.grad = None

    def step(self) -> None:
        self._gradients_to_masters()
        for optimizer in self.optimizers:
            optimizer.step()
        self._masters_to_tables()

    def _gradients_to_masters(self) -> None:
        """Hand each bfloat16 table's gradient to its master, in float32 (sparse stays sparse);
        added to what the master holds, as backward passes add into ``.grad``."""
        for table, master in self.masters:
            if table.grad is None:
                continue
            grad = table.grad.float()  # dense (N, D), or sparse with the rows read
            grad = grad if master.grad is None else master.grad + grad
            master.grad = grad.coalesce() if grad.is_sparse else grad
            table.grad = None

    @torch.no_grad()
    def _masters_to_tables(self) -> None:
        """Round the masters that just stepped into their tables (SparseAdam: the rows read)."""
        for table, master in self.masters:
            if master.grad is None:
                continue
            if master.grad.is_sparse:
                rows = master.grad.indices()[0]  # (U,) coalesced: unique
                table.index_copy_(0, rows, master.index_select(0, rows).to(table.dtype))
            else:
                table.copy_(master)

    def clip_grad_norm_(self, max_norm: float, value_max_norm: float | None = None) -> float:
        """Clip dense and value gradients separately; returns the dense gradient norm.

        ``value_max_norm`` defaults to ``max_norm``. Sparse gradients are clipped on their stored
        rows (the norm of a sparse gradient is the norm of its coalesced values); a bfloat16
        table's gradient is clipped in float32, on its master.
        """
        self._gradients_to_masters()
        dense_params = [p for g in self.dense.param_groups for p in g["params"]]
        dense_norm = torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
        limit = max_norm if value_max_norm is None else value_max_norm
        for optimizer in (self.values, self.sparse_values):
            if optimizer is None:
                continue
            for param in (p for g in optimizer.param_groups for p in g["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    param.grad = param.grad.coalesce()
                    stored = param.grad._values()
                else:
                    stored = param.grad
                norm = float(stored.norm())
                if norm > limit:
                    stored.mul_(limit / (norm + 1e-6))
        return float(dense_norm)

    def state_dict(self) -> dict:
        """Each optimizer's state, and the float32 masters of bfloat16 tables (``value_masters``):
        a resumed run goes on from the masters, not from their rounded tables."""
        state = {
            name: None if optimizer is None else optimizer.state_dict()
            for name, optimizer in self._named()
        }
        return {**state, "value_masters": [master for _, master in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self._named():
            if (optimizer is None) != (state[name] is None):
                raise ValueError(f"state has {name}={state[name] is not None}, optimizer differs")
            if optimizer is not None:
                optimizer.load_state_dict(state[name])
        saved = state.get("value_masters", [])  # absent from states saved before bfloat16 tables
        if len(saved) != len(self.masters):
            raise ValueError(
                f"state has {len(saved)} float32 master copies of value tables, this optimizer "
                f"has {len(self.masters)} bfloat16 tables: the models' value_dtype differ"
            )
        for (table, master), copy in zip(self.masters, saved, strict=True):
            master.copy_(copy)
            table.copy_(master)
