"""Shared fixtures: every device test runs on CPU, and on CUDA too when it is present."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def materialise_product_keys(subkeys: torch.Tensor) -> torch.Tensor:
    """All n^2 keys: (H, 2, n, d/2) -> (H, n*n, d); key i1*n + i2 is [c1[i1], c2[i2]]."""
    heads, _, n, half = subkeys.shape
    first = subkeys[:, 0].unsqueeze(2).expand(heads, n, n, half)  # (H, n, n, d/2) varies with i1
    second = subkeys[:, 1].unsqueeze(1).expand(heads, n, n, half)  # (H, n, n, d/2) varies with i2
    return torch.cat([first, second], dim=-1).reshape(heads, n * n, 2 * half)
