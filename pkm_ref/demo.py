"""``pkm-ref demo``: a one-minute tour of a product-key memory layer.

Builds a ``ProductKeyMemory``, checks its search against brute force over the materialised keys,
runs a forward and backward pass, and prints the usage statistics of one batch. Sizes follow the
runtime profile (``--profile`` or ``PKM_REF_PROFILE``).
"""

from __future__ import annotations

import argparse
import time

import torch

from pkm_ref.memory import ProductKeyMemory
from pkm_ref.profiles import add_profile_argument, by_profile, current_profile, profile_device
from pkm_ref.search import product_topk
from pkm_ref.usage import memory_usage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    profile = args.profile or current_profile()
    torch.manual_seed(args.seed)
    n_keys = by_profile(smoke=32, cpu=512, gpu=512, profile=profile)
    batch = by_profile(smoke=(2, 16), cpu=(8, 128), gpu=(32, 512), profile=profile)
    device = profile_device(profile)
    memory = ProductKeyMemory(256, 256, n_keys=n_keys, k_dim=128, heads=4, knn=32).to(device)
    print(f"profile {profile} on {device}: {memory}")
    print(f"{memory.n_slots:,} slots, {sum(p.numel() for p in memory.parameters()):,} parameters")

    # Exactness: product-key search == brute force over the n_keys**2 concatenated keys.
    query = torch.randn(64, 128, device=device)  # (64, k_dim)
    subkeys = memory.subkeys[0].detach()  # (2, n, k_dim/2)
    full_keys = torch.cat(  # (n*n, k_dim): key i1*n + i2 = [c1[i1], c2[i2]]
        [subkeys[0].repeat_interleave(n_keys, 0), subkeys[1].repeat(n_keys, 1)], dim=1
    )
    _, product_idx = product_topk(query, subkeys, 32)  # (64, 32)
    _, brute_idx = (query @ full_keys.T).topk(32, dim=-1)  # (64, 32)
    print(f"product-key search equals brute force: {bool((product_idx == brute_idx).all())}")

    x = torch.randn(*batch, 256, device=device, requires_grad=True)  # (B, T, 256)
    start = time.perf_counter()
    y = memory(x)  # (B, T, 256)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    print(f"forward+backward on {tuple(x.shape)} -> {tuple(y.shape)}: {elapsed * 1e3:.0f} ms")

    memory.eval()
    memory.record_usage = True
    with torch.no_grad():
        memory(x)
    stats = memory_usage(memory.last_indices, memory.n_slots, memory.last_weights)
    print(
        f"one batch read {stats.selected.usage:.1%} of the slots "
        f"(KL to uniform {stats.selected.kl_uniform:.2f} nats)"
    )
    return 0
