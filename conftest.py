"""Tests and nbval always run the smoke profile: tiny sizes, every code path.

Set here, before any test or notebook kernel starts: nbval kernels inherit pytest's environment.
Smoke runs write figures to a scratch folder (see ``pkm_ref.figures``), never into ``figures/``.

Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter. ``triton.jit`` reads
TRITON_INTERPRET once, when a kernel module is imported, so it is set here, before any test can
import one; a process with CUDA keeps it unset and tests the compiled kernels on the GPU. Nothing
else reads it: without CUDA no Triton kernel could run otherwise.
"""

import os

import torch

os.environ["PKM_REF_PROFILE"] = "smoke"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
