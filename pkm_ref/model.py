"""A compact GPT-style language model whose feed-forward layers can be memory layers.

Taught in ``notebooks/05_train_pkm_lm.ipynb``.

The model is a decoder-only transformer in the style of nanoGPT: token and learned position
embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention, then a feed-forward network),
a final LayerNorm and an output layer tied to the token embedding. In the blocks listed in
``ModelConfig.memory_layers`` the feed-forward network is replaced by a key-value memory, as in
the paper:

    x = x + attention(ln_1(x))           every block
    x = x + ffn(ln_2(x))                 dense block
    x = x + memory(ln_2(x))              memory block: ProductKeyMemory or FlatKeyMemory

A memory with batchnorm queries normalises over every position of the batch at train time, so a
token's query sees statistics of later tokens: a small leak of the future that layernorm queries do
not have. In eval mode batchnorm uses its running averages and the model is exactly causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pkm_ref import _checks
from pkm_ref.memory import KERNELS, FlatKeyMemory, ProductKeyMemory, _KeyValueMemory
from pkm_ref.profiles import by_profile

MEMORY_KINDS = ("product", "flat")
VALUE_DTYPES = ("float32", "bfloat16")  # names of the torch dtypes in ``pkm_ref.memory``


@dataclass
class MemoryConfig:
    """A memory layer; ``kind="flat"`` gets ``n_keys**2`` slots too, so both compare at one size."""

    kind: str = "product"
    n_keys: int = 128
    k_dim: int = 128
    heads: int = 4
    knn: int = 32
    query_norm: str | None = "batchnorm"
    sparse: bool = False
    compiled_read: bool = False  # fused torch.compile value read (see ``pkm_ref.memory``)
    value_dtype: str = "float32"  # or "bfloat16": half the bytes per read (see ``pkm_ref.optim``)
    kernels: str = "auto"  # "torch" or "triton": speed, not results (see ``pkm_ref.memory``)
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0

    def __post_init__(self) -> None:
        _checks.one_of("memory kind", self.kind, MEMORY_KINDS)
        _checks.one_of("value_dtype", self.value_dtype, VALUE_DTYPES)  # a name: saved as JSON
        _checks.one_of("kernels", self.kernels, KERNELS)
        for name in ("n_keys", "k_dim", "heads", "knn"):  # plain ints: configs are saved as JSON
            setattr(self, name, _checks.positive_int(name, getattr(self, name)))

    @property
    def n_slots(self) -> int:
        return self.n_keys**2


@dataclass
class ModelConfig:
    """Sizes of the language model, and which blocks hold a memory instead of an FFN."""

    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0
    memory_layers: tuple[int, ...] = ()
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            setattr(self, name, _checks.positive_int(name, getattr(self, name)))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        _checks.probability("dropout", self.dropout)
        if isinstance(self.memory, dict):  # rebuilt from a checkpoint or a JSON file
            self.memory = MemoryConfig(**self.memory)
        self.memory_layers = tuple(self.memory_layers)
        for index in self.memory_layers:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"memory layer index must be an int, got {index!r}")
            if not 0 <= index < self.n_layer:
                raise ValueError(
                    f"memory layer index {index} is out of range: the model has n_layer="
                    f"{self.n_layer} blocks, numbered 0 to {self.n_layer - 1}"
                )
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"memory_layers has a repeated index: {self.memory_layers}")

    @classmethod
    def for_profile(cls, profile: str, **overrides) -> ModelConfig:
        """The compact model of ``profile`` (dense unless ``memory_layers`` is overridden).

        smoke: tiny, for tests; cpu: 2 x 256 wide with 64² = 4,096 memory slots, minutes on two
        cores; gpu: 6 x 512 with 512² = 262,144 slots (the paper's memory size).
        """
        sizes = by_profile(
            smoke=dict(block_size=32, n_layer=2, n_head=2, d_model=32,
                       memory=MemoryConfig(n_keys=8, k_dim=16, heads=2, knn=4)),
            cpu=dict(block_size=128, n_layer=2, n_head=4, d_model=256,
                     memory=MemoryConfig(n_keys=64, k_dim=128, heads=4, knn=32)),
            gpu=dict(block_size=256, n_layer=6, n_head=8, d_model=512,
                     memory=MemoryConfig(n_keys=512, k_dim=128, heads=4, knn=32)),
            profile=profile,
        )  # fmt: skip
        return cls(**{**sizes, **overrides})


def middle_layer(n_layer: int) -> int:
    """The block of a single memory: the middle one, ``n_layer // 2`` (the paper's ablation, §4.5,
    finds an intermediate layer best and the first one worst)."""
    return _checks.positive_int("n_layer", n_layer) // 2


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``forward(x (B, T, C)) -> (B, T, C)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)  # (B, T, C) each
        q, k, v = (  # (B, n_head, T, C / n_head) each
            t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in (q, k, v)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, n_head, T, C / n_head)
        y = y.transpose(1, 2).reshape(batch, time, channels)  # (B, T, C)
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise GELU network with hidden size 4·C: ``forward(x (B, T, C)) -> (B, T, C)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.down = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))  # (B, T, C)


def build_memory(config: ModelConfig) -> _KeyValueMemory:
    """The memory layer of ``config.memory``, reading and writing vectors of size ``d_model``."""
    m = config.memory
    options = dict(
        k_dim=m.k_dim, heads=m.heads, knn=m.knn, query_norm=m.query_norm, sparse=m.sparse,
        compiled_read=m.compiled_read, value_dtype=getattr(torch, m.value_dtype), kernels=m.kernels,
        input_dropout=m.input_dropout, query_dropout=m.query_dropout, value_dropout=m.value_dropout,
    )  # fmt: skip
    if m.kind == "product":
        return ProductKeyMemory(config.d_model, config.d_model, n_keys=m.n_keys, **options)
    return FlatKeyMemory(config.d_model, config.d_model, n_slots=m.n_slots, **options)


class Block(nn.Module):
    """A pre-LayerNorm transformer block whose FFN may be a memory layer.

    ``forward(x (B, T, C), mask=None (B, T) bool) -> (B, T, C)``; ``mask`` marks real positions
    and only reaches the memory (its batchnorm statistics skip padding).
    """

    def __init__(self, config: ModelConfig, use_memory: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.ffn = build_memory(config) if use_memory else FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        if isinstance(self.ffn, _KeyValueMemory):
            return x + self.ffn(self.ln_2(x), mask)  # (B, T, C)
        return x + self.ffn(self.ln_2(x))  # (B, T, C)


class LanguageModel(nn.Module):
    """A GPT-style decoder: ``forward(idx (B, T), targets=None) -> (logits (B, T, V), loss)``.

    ``loss`` is the mean next-token cross-entropy in nats when ``targets`` (B, T) is given, else
    None. Blocks listed in ``config.memory_layers`` hold a memory instead of an FFN. Also:
    ``generate``, ``memory_layers()`` and ``parameter_counts()`` (total and active per token).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, use_memory=i in config.memory_layers) for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying
        self._init_dense_weights()

    def _init_dense_weights(self) -> None:
        # GPT-2 initialisation for everything but the memories, which keep their own (values
        # N(0, 1/d), keys uniform). Projections into the residual stream are scaled down by
        # sqrt(2 · n_layer), so the stream's variance does not grow with depth.
        dense = [self.token_embedding, self.position_embedding]
        dense += [block.attn for block in self.blocks]
        dense += [block.ffn for block in self.blocks if isinstance(block.ffn, FeedForward)]
        for module in (m for part in dense for m in part.modules()):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            if isinstance(block.ffn, FeedForward):
                nn.init.normal_(block.ffn.down.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T), and the loss if ``targets``.

        ``mask`` (B, T) bool marks real tokens in a right-padded batch (None: all real, as in the
        fixed-length windows of training). Padded positions stay out of the memories' batchnorm
        statistics and out of the loss; causal attention already keeps them from earlier tokens.
        """
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be (B, T) int64, got {idx.dtype} {tuple(idx.shape)}")
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.config.block_size}")
        positions = torch.arange(time, device=idx.device)  # (T,)
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, C)
        x = self.dropout(x)  # (B, T, C)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        if mask is not None:
            targets = targets.masked_fill(~mask, -100)  # (B, T); -100: ignored by the loss
        loss = F.cross_entropy(  # scalar, nats per real token
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
        )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` (B, T): returns (B, T + new).

        Runs in eval mode (batchnorm queries use their running averages; a one-token batch has no
        batch statistics) and restores the previous mode afterwards.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        max_new_tokens = _checks.nonnegative_int("max_new_tokens", max_new_tokens)
        if top_k is not None:
            top_k = _checks.positive_int("top_k", top_k)
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <= block_size)
            logits, _ = self(context)  # (B, T, V)
            logits = logits[:, -1, :].float() / temperature  # (B, V)
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
            probs = F.softmax(logits, dim=-1)  # (B, V)
            next_token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)  # (B, T + 1)
        self.train(was_training)
        return idx

    def memory_layers(self) -> list[_KeyValueMemory]:
        """The memory modules, in block order."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, _KeyValueMemory)]

    def parameter_counts(self) -> dict[str, int]:
        """``total``: every parameter (tied weights once). ``active``: what one token touches.

        A memory layer is active through its query network, its keys (all are scored, directly or
        as sub-keys) and the ``heads · knn`` value rows it reads, not the whole value table.
        """
        total = sum(p.numel() for p in self.parameters())
        untouched = sum(
            (memory.n_slots - min(memory.heads * memory.knn, memory.n_slots)) * memory.output_dim
            for memory in self.memory_layers()
        )
        return {"total": total, "active": total - untouched}
