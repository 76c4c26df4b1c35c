"""What the Triton kernels of ``search_triton`` and ``read_triton`` share: importing them with a
clear error when Triton is missing, asking once whether they import at all (``available``: the
layers' ``kernels="auto"``), and refusing tensors they cannot run on.

Triton decides when it decorates a kernel whether the kernel is compiled (CUDA) or run by its CPU
interpreter (``TRITON_INTERPRET=1``, set before ``import triton``); each kernel module records that
choice as ``INTERPRETED`` when it is imported, and passes it to ``check_runnable``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


def import_kernels(module: str, caller: str, instead: str) -> ModuleType:
    """``pkm_ref.<module>``, imported on first use, so ``import pkm_ref`` never needs Triton.

    Without Triton: a ``ModuleNotFoundError`` saying that ``caller`` needs it, how to install it,
    and the torch path to use ``instead``.
    """
    try:
        return importlib.import_module(f"pkm_ref.{module}")
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        raise ModuleNotFoundError(
            f"{caller} needs the triton package: pip install triton (Linux; the CUDA builds of "
            f"torch bring it), or use {instead}",
            name="triton",
        ) from error


@functools.cache
def available() -> bool:
    """Whether both kernel modules import (triton installed and working): asked once per process,
    since a layer with ``kernels="auto"`` asks on every forward on CUDA."""
    try:
        for module in ("search_triton", "read_triton"):
            importlib.import_module(f"pkm_ref.{module}")
    except ImportError:  # no triton, or one that cannot load here: the torch path serves
        return False
    return True


def check_runnable(device: torch.device, interpreted: bool, caller: str, instead: str) -> None:
    """Raise unless kernels decorated with ``interpreted`` can run on ``device``'s tensors: CUDA
    tensors when compiled, CPU tensors in the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return
    raise RuntimeError(
        f"{caller} runs on CUDA tensors, got {device.type} tensors. Move them to a GPU, use "
        f"{instead}, or run Triton's (slow) CPU interpreter: set TRITON_INTERPRET=1 before triton "
        "is first imported"
    )
