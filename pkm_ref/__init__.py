"""pkm_ref: a reference implementation of Product-Key Memory layers.

Lample, Sablayrolles, Ranzato, Denoyer, Jégou, "Large Memory Layers with Product Keys",
NeurIPS 2019 (arXiv 1907.05242). The notebooks in ``notebooks/`` teach every object below.

Search (``pkm_ref.search``):
    flat_topk(query (..., d), keys (N, d), knn) -> scores, indices (..., knn)
    product_topk(query (..., k_dim), subkeys (2, n, k_dim/2), knn) -> scores, indices (..., knn)
        multi-head: query (..., H, k_dim), subkeys (H, 2, n, k_dim/2) -> (..., H, knn)
        method "fast" (default), "reference" or "triton" (one fused GPU kernel)

Layers (``pkm_ref.memory``):
    ProductKeyMemory(input_dim, output_dim, n_keys, k_dim, heads, knn, query_norm="batchnorm")
    FlatKeyMemory(input_dim, output_dim, n_slots, k_dim, heads, knn, query_norm="batchnorm")
        forward(x (..., input_dim), mask=None (...,) bool) -> (..., output_dim)
        kernels="auto" (Triton on CUDA when it imports, else torch), "torch" or "triton"

Value read (``pkm_ref.read``; the Triton kernels in ``pkm_ref.read_triton``, imported on use):
    read_bags(table (N, D), indices (B, J), weights (B, J), method="embedding_bag") -> (B, D)
        method "embedding_bag", "compiled" (torch.compile) or "triton"; float32 or bf16 tables

Usage metrics (``pkm_ref.usage``):
    memory_usage(indices, n_slots, weights=None) -> UsageStats; UsageAccumulator for many batches

Optimizer split (``pkm_ref.optim``):
    value_parameters(model) -> the value tables; SplitOptimizer(model, lr, value_lr=1e-3)

Cost model (``pkm_ref.cost``):
    product_memory_cost(...), flat_memory_cost(...), ffn_cost(...) -> LayerCost per token

Speed, measured (``pkm_ref.bench``, the command ``pkm-ref bench``):
    retrieval | layer | model | paper, each kernel path in its own rows (``--kernels``); ``paper``:
    12 blocks + a memory against 24 at the paper's width, inference and one training step

Example:
    >>> import torch, pkm_ref
    >>> memory = pkm_ref.ProductKeyMemory(input_dim=64, output_dim=64, n_keys=32, knn=8)
    >>> memory(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
"""

from pkm_ref.cost import LayerCost, ffn_cost, flat_memory_cost, product_memory_cost
from pkm_ref.memory import FlatKeyMemory, ProductKeyMemory
from pkm_ref.optim import SplitOptimizer, value_parameters
from pkm_ref.profiles import by_profile, current_profile
from pkm_ref.query import MaskedBatchNorm1d, QueryNetwork
from pkm_ref.search import flat_topk, product_topk
from pkm_ref.usage import SlotDistribution, UsageAccumulator, UsageStats, memory_usage

__version__ = "0.1.0"

__all__ = [
    "FlatKeyMemory",
    "LayerCost",
    "MaskedBatchNorm1d",
    "ProductKeyMemory",
    "QueryNetwork",
    "SlotDistribution",
    "SplitOptimizer",
    "UsageAccumulator",
    "UsageStats",
    "by_profile",
    "current_profile",
    "ffn_cost",
    "flat_memory_cost",
    "flat_topk",
    "memory_usage",
    "product_memory_cost",
    "product_topk",
    "value_parameters",
]
