"""The optimizer split: memory values learn on their own schedule.

Taught in ``notebooks/04_multihead_memory_gpu.ipynb``.

Each step updates only the few value rows that were read, so the values see far fewer updates than
the rest of the network. The paper trains them with their own optimizer: Adam at a constant
learning rate of 1e-3, while the dense parameters use their own rate and schedule. With
``sparse=True`` value tables produce sparse gradients, which only ``SparseAdam`` accepts; dense
value tables use ``Adam``. A value table never appears in the dense group.
"""

from __future__ import annotations

import torch
from torch import nn

from pkm_ref.memory import _KeyValueMemory


def value_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The value tables (``values.weight``) of every memory layer inside ``module``."""
    return [m.values.weight for m in module.modules() if isinstance(m, _KeyValueMemory)]


class SplitOptimizer:
    """One optimizer for the dense parameters, and separate ones for the memory value tables.

    ``dense``: ``torch.optim.AdamW`` over every parameter that is not a value table (its learning
    rate is yours to schedule). ``values``: ``Adam`` over the dense-gradient value tables, and
    ``sparse_values``: ``SparseAdam`` over the sparse ones, both at a constant ``value_lr``.
    Either value optimizer is None when there is no such table.

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
        sparse_tables = [m.values.weight for m in memories if m.sparse]
        dense_tables = [m.values.weight for m in memories if not m.sparse]
        value_ids = {id(p) for p in sparse_tables + dense_tables}
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

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def clip_grad_norm_(self, max_norm: float, value_max_norm: float | None = None) -> float:
        """Clip dense and value gradients separately; returns the dense gradient norm.

        ``value_max_norm`` defaults to ``max_norm``. Sparse gradients are clipped on their stored
        rows (the norm of a sparse gradient is the norm of its coalesced values).
        """
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
        return {
            name: None if optimizer is None else optimizer.state_dict()
            for name, optimizer in self._named()
        }

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self._named():
            if (optimizer is None) != (state[name] is None):
                raise ValueError(f"state has {name}={state[name] is not None}, optimizer differs")
            if optimizer is not None:
                optimizer.load_state_dict(state[name])
