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


def bfloat16_memories() -> TwoMemories:
    model = TwoMemories()
    for memory in (model.dense_memory, model.sparse_memory):
        memory.values.to(torch.bfloat16)  # as value_dtype=torch.bfloat16 builds it
    return model


def test_bfloat16_tables_are_trained_through_float32_masters():
    model = bfloat16_memories()
    optimizer = SplitOptimizer(model)
    tables = [model.dense_memory.values.weight, model.sparse_memory.values.weight]
    assert [table for table, _ in optimizer.masters] == tables
    for (table, master), group in zip(
        optimizer.masters, (optimizer.values, optimizer.sparse_values), strict=True
    ):
        assert master.dtype == torch.float32 and torch.equal(master.bfloat16(), table)
        assert group.param_groups[0]["params"] == [master]  # the optimizer holds the master
    dense_ids = {id(p) for g in optimizer.dense.param_groups for p in g["params"]}
    assert not dense_ids & {id(table) for table in tables}


def test_many_small_steps_are_not_lost_to_bfloat16_rounding():
    """Values at 1.0, where bfloat16's spacing is 2^-7 (2^-8 just below 1): 50 Adam steps of
    -1e-3 each. Adam on the bfloat16 table itself rounds every step away; the master keeps them."""
    model = bfloat16_memories()
    table = model.dense_memory.values.weight
    with torch.no_grad():
        table.fill_(1.0)
    optimizer = SplitOptimizer(model, value_lr=1e-3)
    plain = torch.nn.Parameter(table.detach().clone())  # bfloat16, for plain Adam
    plain_adam = torch.optim.Adam([plain], lr=1e-3)
    for _ in range(50):
        optimizer.zero_grad()
        table.grad = torch.ones_like(table)  # a constant gradient: Adam steps by exactly lr
        plain.grad = torch.ones_like(plain)
        optimizer.step()
        plain_adam.step()
    (_, master), _ = optimizer.masters
    torch.testing.assert_close(master, torch.full_like(master, 0.95), rtol=0, atol=1e-5)
    assert torch.equal(table, master.bfloat16())  # the table: the master rounded to nearest
    assert table.float().sub(0.95).abs().max() < 2**-9
    assert plain.eq(1.0).all()  # every step lost


def test_bfloat16_sparse_table_moves_only_the_rows_read():
    torch.manual_seed(2)
    model = bfloat16_memories()
    optimizer = SplitOptimizer(model)
    table = model.sparse_memory.values.weight
    (_, _), (_, master) = optimizer.masters
    before = table.detach().clone()
    model(torch.randn(3, 8)).pow(2).sum().backward()
    read = set(table.grad.coalesce().indices()[0].tolist())
    optimizer.clip_grad_norm_(1.0)
    assert table.grad is None and master.grad.is_sparse and master.grad.dtype == torch.float32
    optimizer.step()
    changed = (table.detach() != before).any(-1)  # (n_slots,)
    assert set(changed.nonzero().flatten().tolist()) <= read and len(read) > 0
    assert torch.equal(table, master.bfloat16())
    optimizer.zero_grad()
    assert master.grad is None and table.grad is None


def test_bfloat16_value_gradients_are_clipped_in_float32():
    torch.manual_seed(1)
    model = bfloat16_memories()
    optimizer = SplitOptimizer(model)
    (model(torch.randn(16, 8)) * 1e4).sum().backward()
    optimizer.clip_grad_norm_(1.0, value_max_norm=0.5)
    (dense_table, dense_master), (_, sparse_master) = optimizer.masters
    assert dense_table.grad is None
    assert float(dense_master.grad.norm()) <= 0.5 + 1e-4
    assert float(sparse_master.grad.coalesce()._values().norm()) <= 0.5 + 1e-4


def test_state_dict_carries_the_float32_masters():
    torch.manual_seed(3)
    model = bfloat16_memories()
    optimizer = SplitOptimizer(model)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    masters = [master.clone() for _, master in optimizer.masters]
    assert [m.data_ptr() for m in state["value_masters"]] == [
        m.data_ptr() for _, m in optimizer.masters
    ]
    restored = SplitOptimizer(model)  # masters rebuilt from the rounded tables
    restored.load_state_dict(state)
    for (table, master), saved in zip(restored.masters, masters, strict=True):
        assert torch.equal(master, saved) and torch.equal(table, saved.bfloat16())
    with pytest.raises(ValueError, match=r"0 float32 master copies.*2 bfloat16 tables"):
        restored.load_state_dict({**state, "value_masters": []})
    float32 = SplitOptimizer(TwoMemories())
    assert float32.masters == [] and float32.state_dict()["value_masters"] == []


def test_bfloat16_gradients_accumulate_until_zero_grad():
    """Backward passes add into a table's gradient; one that lands after clipping handed the
    first to the master is added to it, not lost."""
    torch.manual_seed(4)
    model = bfloat16_memories()
    optimizer = SplitOptimizer(model)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    optimizer.clip_grad_norm_(1e9)  # hands the gradients to the masters, clips nothing
    once = [master.grad.to_dense().clone() for _, master in optimizer.masters]
    model(x).sum().backward()
    optimizer.clip_grad_norm_(1e9)
    for (_, master), first in zip(optimizer.masters, once, strict=True):
        torch.testing.assert_close(master.grad.to_dense(), 2 * first)
