"""The optimizer split: value tables in their own optimizer, sparse ones in SparseAdam."""

import pytest
import torch
from torch import nn

from pkm_ref import ProductKeyMemory, SplitOptimizer, value_parameters


class TwoMemories(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.dense_memory = ProductKeyMemory(8, 8, n_keys=8, k_dim=4, heads=2, knn=2)
        self.sparse_memory = ProductKeyMemory(8, 8, n_keys=8, k_dim=4, heads=2, knn=2, sparse=True)

    def forward(self, x):
        return self.sparse_memory(self.dense_memory(self.inp(x)))


def test_value_parameters_found():
    model = TwoMemories()
    assert [id(p) for p in value_parameters(model)] == [
        id(model.dense_memory.values.weight),
        id(model.sparse_memory.values.weight),
    ]


def test_no_parameter_in_two_groups_and_none_left_out():
    model = TwoMemories()
    optimizer = SplitOptimizer(model, lr=1e-4, value_lr=1e-3)
    seen = [id(p) for o in optimizer.optimizers for g in o.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    assert isinstance(optimizer.sparse_values, torch.optim.SparseAdam)
    assert optimizer.sparse_values.param_groups[0]["params"] == [model.sparse_memory.values.weight]
    assert optimizer.values.param_groups[0]["params"] == [model.dense_memory.values.weight]
    assert optimizer.values.param_groups[0]["lr"] == 1e-3
    assert optimizer.dense.param_groups[0]["lr"] == 1e-4


def test_sparse_path_steps_and_leaves_unread_rows_alone():
    torch.manual_seed(0)
    model = TwoMemories()
    optimizer = SplitOptimizer(model)
    before = model.sparse_memory.values.weight.detach().clone()
    x = torch.randn(3, 8)
    model(x).pow(2).sum().backward()
    read = set(model.sparse_memory.values.weight.grad.coalesce().indices()[0].tolist())
    optimizer.clip_grad_norm_(1.0)
    optimizer.step()
    changed = (model.sparse_memory.values.weight.detach() != before).any(-1)  # (n_slots,)
    assert set(changed.nonzero().flatten().tolist()) == read
    assert len(read) > 0


def test_clipping_bounds_dense_and_value_gradient_norms():
    torch.manual_seed(1)
    model = TwoMemories()
    optimizer = SplitOptimizer(model)
    (model(torch.randn(16, 8)) * 1e4).sum().backward()
    others = [p for g in optimizer.dense.param_groups for p in g["params"] if p.grad is not None]
    norm_before = float(torch.cat([p.grad.flatten() for p in others]).norm())
    returned = optimizer.clip_grad_norm_(1.0, value_max_norm=0.5)
    norm_after = float(torch.cat([p.grad.flatten() for p in others]).norm())
    assert returned == pytest.approx(norm_before, rel=1e-4) and norm_before > 1.0
    assert norm_after == pytest.approx(1.0, rel=1e-3)
    dense_grad = model.dense_memory.values.weight.grad
    sparse_grad = model.sparse_memory.values.weight.grad.coalesce()._values()
    assert float(dense_grad.norm()) <= 0.5 + 1e-4
    assert float(sparse_grad.norm()) <= 0.5 + 1e-4


def test_state_dict_round_trip():
    model = TwoMemories()
    optimizer = SplitOptimizer(model)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    restored = SplitOptimizer(model)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state_dict()["sparse_values"]["state"].keys() == {0}


def test_bad_learning_rates():
    with pytest.raises(ValueError, match="value_lr must be > 0, got 0"):
        SplitOptimizer(TwoMemories(), value_lr=0)
