"""Small helpers the notebooks share: set-up, showing and saving figures, attaching widgets.

Imported by the notebooks only (it uses matplotlib and ipywidgets); the core never imports it.
"""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Callable
from typing import Any

import torch

from pkm_ref import figures
from pkm_ref.profiles import current_profile, profile_device

REPOSITORY = "pkm-ref/pkm_ref"  # GitHub owner/name used by the Colab badges and install cells


def setup(seed: int = 0) -> tuple[str, torch.device]:
    """Seed every RNG, print what this kernel runs on, and return (profile, device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    profile = current_profile()
    device = profile_device(profile)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"profile: {profile} (set PKM_REF_PROFILE=smoke|cpu|gpu to change)")
    print(f"device: {device}{gpu}; torch {torch.__version__}; python {platform.python_version()}")
    return profile, device


def show(fig: Any, name: str) -> None:
    """Save ``fig`` through ``pkm_ref.figures`` and display it: into ``results/<profile>/`` beside
    the notebook (smoke: a scratch folder; ``pkm-ref reproduce``: its results folder), never into
    the committed ``figures/``.

    In a notebook the saved PNG itself is displayed as an output of the cell, whatever
    matplotlib's backend (under ``MPLBACKEND=Agg`` a notebook would otherwise be committed without
    its figures), and the figure is closed so that the inline backend does not draw it again.
    """
    import matplotlib.pyplot as plt

    profile = current_profile()
    path = figures.save_figure(fig, name, profile, profile_device(profile))
    if profile != "smoke":
        print(f"saved {os.path.relpath(path)}")
    if _in_kernel():
        from IPython.display import Image, display

        display(Image(filename=str(path)))
        plt.close(fig)
    else:  # a script or terminal IPython: the backend's own window, if any
        plt.show()


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (a notebook, nbclient, Colab), not in terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def attach_widget(function: Callable[..., None], **controls: Any) -> None:
    """Attach ipywidgets controls to ``function`` (as ``ipywidgets.interactive``) and display them.

    Call it after the static figure has been drawn, so the notebook reads well where widgets do not
    render (GitHub, nbval, a headless run). ``controls`` are ipywidgets (sliders, dropdowns) keyed
    by the argument of ``function`` they set. Needs a live kernel to react; the first call draws.
    """
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError:  # plain Python: nothing to attach to
        print("ipywidgets is not installed: pip install ipywidgets for the interactive version")
        return
    widget = ipywidgets.interactive(function, **controls)
    display(widget)
