"""The compact language model: shapes, causality, where the memories sit, parameter counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pkm_ref import FlatKeyMemory, ProductKeyMemory
from pkm_ref.model import (
    FeedForward,
    LanguageModel,
    MemoryConfig,
    ModelConfig,
    middle_layer,
)

TINY_MEMORY = MemoryConfig(n_keys=8, k_dim=16, heads=2, knn=4)


def tiny_config(**overrides) -> ModelConfig:
    sizes = dict(vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=32, memory=TINY_MEMORY)
    return ModelConfig(**{**sizes, **overrides})


def tokens(batch: int = 4, time: int = 16, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("memory_layers", [(), (1,)])
def test_forward_shapes_and_initial_loss(memory_layers: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(memory_layers=memory_layers))
    idx = tokens()
    logits, loss = model(idx)
    assert logits.shape == (4, 16, 64) and loss is None
    _, loss = model(idx, tokens(seed=1))
    assert loss.shape == () and abs(loss.item() - math.log(64)) < 0.1  # uniform at init


def test_forward_rejects_bad_input() -> None:
    model = LanguageModel(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(tokens(time=17))
    with pytest.raises(ValueError, match="int64"):
        model(tokens().float())


def _future_changes_past(model: LanguageModel, cut: int = 9) -> bool:
    idx = tokens(seed=1)
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % 64  # every future token differs
    before, _ = model(idx)
    after, _ = model(changed)
    return not torch.allclose(before[:, :cut], after[:, :cut], atol=1e-6)


@pytest.mark.parametrize(
    ("memory_layers", "query_norm", "train_mode"),
    [((), "batchnorm", True), ((1,), "layernorm", True), ((1,), "batchnorm", False)],
)
def test_future_tokens_do_not_change_earlier_logits(
    memory_layers: tuple[int, ...], query_norm: str, train_mode: bool
) -> None:
    torch.manual_seed(0)
    memory = dataclasses.replace(TINY_MEMORY, query_norm=query_norm)
    model = LanguageModel(tiny_config(memory_layers=memory_layers, memory=memory))
    model.train(train_mode)
    assert not _future_changes_past(model)


def test_batchnorm_queries_leak_the_future_in_training() -> None:
    # Batch statistics mix positions (notebook 03, section 7). Eval mode (above) is exactly causal.
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(memory_layers=(1,))).train()
    assert _future_changes_past(model)


def test_padding_mask_keeps_padded_tokens_out_of_statistics_and_loss() -> None:
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(memory_layers=(1,))).train()  # batchnorm queries
    idx, targets = tokens(), tokens(seed=2)
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[:2, 10:] = False  # two right-padded sequences
    changed = idx.clone()
    changed[~mask] = (changed[~mask] + 1) % 64  # other padding tokens
    logits, loss = model(idx, targets, mask)
    logits_changed, loss_changed = model(changed, targets, mask)
    assert torch.allclose(logits[mask], logits_changed[mask], atol=1e-6)
    assert torch.allclose(loss, loss_changed, atol=1e-6)
    _, unmasked = model(changed, targets)
    assert not torch.allclose(loss, unmasked, atol=1e-6)


def test_memory_layers_are_placed_where_asked() -> None:
    model = LanguageModel(tiny_config(memory_layers=(0, 2)))
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [ProductKeyMemory, FeedForward, ProductKeyMemory]
    assert model.memory_layers() == [model.blocks[0].ffn, model.blocks[2].ffn]
    flat = LanguageModel(tiny_config(memory_layers=(1,), memory=dataclasses.replace(
        TINY_MEMORY, kind="flat")))  # fmt: skip
    (memory,) = flat.memory_layers()
    assert isinstance(memory, FlatKeyMemory) and memory.n_slots == 8**2
    assert LanguageModel(tiny_config()).memory_layers() == []


def test_compiled_read_config_gives_the_same_loss_and_gradients() -> None:
    """``MemoryConfig.compiled_read`` reaches the layer and changes no number the model computes."""
    torch.manual_seed(0)
    eager = LanguageModel(tiny_config(memory_layers=(1,)))
    compiled_memory = dataclasses.replace(TINY_MEMORY, compiled_read=True)
    compiled = LanguageModel(tiny_config(memory_layers=(1,), memory=compiled_memory))
    compiled.load_state_dict(eager.state_dict())
    assert [m.compiled_read for m in (*eager.memory_layers(), *compiled.memory_layers())] == [
        False, True
    ]  # fmt: skip
    losses = [model(tokens(), tokens(seed=1))[1] for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("bad", [(3,), (-1,), (1, 1)])
def test_bad_memory_layer_index_raises(bad: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"memory layer index {bad[0]}|repeated"):
        tiny_config(memory_layers=bad)


def test_bad_config_values_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(n_head=3)
    with pytest.raises(ValueError, match="memory kind"):
        MemoryConfig(kind="hash")


def test_middle_layer_and_profile_configs() -> None:
    assert [middle_layer(n) for n in (1, 2, 3, 4, 12)] == [0, 1, 1, 2, 6]
    for profile in ("smoke", "cpu", "gpu"):
        config = ModelConfig.for_profile(profile, memory_layers=(1,))
        assert config.memory_layers == (1,) and config.d_model % config.n_head == 0


def test_config_survives_a_dict_round_trip() -> None:
    config = tiny_config(memory_layers=[2])  # a list, as read back from JSON
    assert config.memory_layers == (2,)
    assert ModelConfig(**dataclasses.asdict(config)) == config


def test_value_dtype_config_builds_bfloat16_tables() -> None:
    """``MemoryConfig.value_dtype`` is a name (configs are saved as JSON); a config saved before
    the field existed reads back with float32 values."""
    config = tiny_config(memory_layers=(1,), memory=dataclasses.replace(
        TINY_MEMORY, value_dtype="bfloat16"))  # fmt: skip
    model = LanguageModel(config)
    (memory,) = model.memory_layers()
    assert memory.values.weight.dtype == torch.bfloat16
    logits, loss = model(tokens(), tokens(seed=1))
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    saved = dataclasses.asdict(config)
    del saved["memory"]["value_dtype"]  # as in a checkpoint written before value_dtype
    assert ModelConfig(**saved).memory.value_dtype == "float32"
    with pytest.raises(ValueError, match=r"value_dtype must be one of \['float32', 'bfloat16'\]"):
        MemoryConfig(value_dtype="float16")


def test_kernels_config_reaches_the_layers() -> None:
    """``MemoryConfig.kernels`` builds layers with those kernels; a config saved before the field
    existed reads back as "auto"."""
    memory_config = dataclasses.replace(TINY_MEMORY, kernels="torch")
    config = tiny_config(memory_layers=(1,), memory=memory_config)
    (memory,) = LanguageModel(config).memory_layers()
    assert memory.kernels == "torch"
    saved = dataclasses.asdict(config)
    del saved["memory"]["kernels"]  # as in a checkpoint written before kernels
    assert ModelConfig(**saved).memory.kernels == "auto"
    with pytest.raises(ValueError, match=r"kernels must be one of \['auto', 'torch', 'triton'\]"):
        MemoryConfig(kernels="cuda")


def test_parameter_counts() -> None:
    dense = LanguageModel(tiny_config())
    counts = dense.parameter_counts()
    # Tied embedding counted once.
    assert counts["total"] == sum(p.numel() for p in dense.parameters()) == counts["active"]
    model = LanguageModel(tiny_config(memory_layers=(1,)))
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    (memory,) = model.memory_layers()
    unread_rows = memory.n_slots - memory.heads * memory.knn  # 64 - 2 * 4
    assert counts["active"] == counts["total"] - unread_rows * 32 < counts["total"]


def test_generate_appends_tokens_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(memory_layers=(1,))).train()
    prompt = tokens(batch=2, time=3)
    out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23) and torch.equal(out[:, :3], prompt) and model.training
    again = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy = model.generate(prompt, 1, top_k=1)
    logits, _ = model.eval()(prompt)
    assert torch.equal(greedy[:, -1], logits[:, -1].argmax(-1))


def test_generate_refuses_bad_lengths_and_top_k() -> None:
    model = LanguageModel(tiny_config())
    prompt = tokens(batch=1, time=3)
    assert torch.equal(model.generate(prompt, 0), prompt)  # nothing to add: the prompt itself
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -3"):
        model.generate(prompt, -3)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        model.generate(prompt, 2, top_k=0)
