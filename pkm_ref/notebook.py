"""Small helpers the notebooks share: set-up, showing and saving figures, reading the committed
results, attaching widgets.

Imported by the notebooks only (it uses matplotlib and ipywidgets); the core never imports it.
"""

from __future__ import annotations

import os
import platform
import random
import threading
from collections.abc import Callable
from typing import Any

import torch

from pkm_ref import figures
from pkm_ref.profiles import current_profile, profile_device

REPOSITORY = "pkm-ref/pkm_ref"  # GitHub owner/name used by the Colab badges and install cells
# Where a notebook reads committed results when it runs outside a clone (Colab, a pip install).
RAW_FILES = f"https://raw.githubusercontent.com/{REPOSITORY}/main"
# The tag of an exercise's solution cell: collapsed in the notebook, committed without outputs.
SOLUTION_TAG = "solution"


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


def reference_file(name: str, gpu: bool = False) -> bytes | None:
    """The committed result file ``name`` (``"lm_comparison.json"``, ``"bench_layer.json"``, a
    figure) of the cpu reference, or of the gpu reference with ``gpu=True``.

    Read from the repository's ``figures/`` (``figures/gpu/``) when pkm_ref runs from a clone;
    elsewhere (Colab, a pip install: the package ships no results) downloaded from the repository
    on GitHub, ``RAW_FILES``. One source of truth either way: the committed files. Returns None,
    after printing a line that says why and what to do, when the file is not committed or cannot
    be downloaded (offline).
    """
    folder = "figures/gpu" if gpu else "figures"
    committed = figures.reference_dir("gpu" if gpu else "cpu")
    if committed is not None:  # a clone: the files are here
        path = committed / name
        if path.exists():
            return path.read_bytes()
        print(f"{folder}/{name} is not committed yet: `pkm-ref reproduce` makes it")
        return None
    from http.client import HTTPException
    from urllib.error import HTTPError
    from urllib.request import urlopen

    url = f"{RAW_FILES}/{folder}/{name}"
    try:
        with urlopen(url, timeout=20) as response:
            return response.read()
    except HTTPError as error:
        print(f"{folder}/{name} could not be downloaded ({error.code} {error.reason}): {url}")
    except (OSError, HTTPException) as error:  # no network, a timeout, a connection cut mid-read
        reason = getattr(error, "reason", None) or error
        print(
            f"{folder}/{name} could not be downloaded ({reason}): the committed results are read "
            f"from GitHub outside a clone of the repository; connect, or clone {REPOSITORY}"
        )
    return None


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (a notebook, nbclient, Colab), not in terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def attach_widget(function: Callable[..., None], **controls: Any) -> None:
    """Display ``controls`` above an output that ``function`` redraws whenever one of them moves.

    ``controls`` are ipywidgets (sliders, dropdowns) keyed by the argument of ``function`` they
    set. ``function`` prints text and draws matplotlib figures (it may end with ``plt.show()``);
    each redraw replaces the output with what it printed and every figure it drew, and closes those
    figures. Call it after the static figure has been drawn, so the notebook reads well where
    widgets do not render (GitHub, nbval, a headless run). ``function`` must be cheap at smoke
    sizes. Taught in notebooks 01-03 and 06.

    Frontends that send widget messages on kernel subshells (JupyterLab 4.6 by default) have
    ipykernel 7 handle them on more than one thread at once, and every widget message ends with
    the post-execution hooks, matplotlib-inline's figure flush among them: with
    ``ipywidgets.interact`` one thread's flush showed and closed the figure another thread was
    still drawing (blank or half-drawn figures, or a mathtext ``ParseException``). Here one redraw
    runs at a time, a redraw overtaken by a newer change is skipped, and figures are drawn with
    matplotlib's interactive mode off and shown explicitly, so no figure ever waits in pyplot for a
    flush.
    """
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError:  # plain Python: nothing to attach to
        print("ipywidgets is not installed: pip install ipywidgets for the interactive version")
        return
    output = ipywidgets.Output()
    redraw = _Redraw(function, controls, output)
    for control in controls.values():
        control.observe(redraw, names="value")
    box = ipywidgets.VBox([*controls.values(), output])
    box.add_class("widget-interact")  # ipywidgets' own layout for interact's boxes
    display(box)
    redraw()


class _Redraw:
    """Calls ``function`` with the current values of ``controls`` and shows what it printed and
    drew in ``output``: one call at a time, whatever thread a change arrives on, and only the
    newest of the changes that queued up meanwhile."""

    def __init__(self, function: Callable[..., None], controls: dict[str, Any], output: Any):
        self._function, self._controls, self._output = function, controls, output
        self._drawing = threading.Lock()  # held while function runs
        self._counting = threading.Lock()  # guards _waiting
        self._waiting = 0  # calls waiting for _drawing

    def __call__(self, _change: Any = None) -> None:
        with self._counting:
            self._waiting += 1
        with self._drawing:
            with self._counting:
                self._waiting -= 1
                if self._waiting:  # a newer change waits: it will draw the newest values
                    return
            self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        values = {name: control.value for name, control in self._controls.items()}
        before = set(plt.get_fignums())
        with self._output:
            self._output.clear_output(wait=True)
            try:
                with plt.ioff():  # no figure queued for matplotlib-inline's flush
                    self._function(**values)
                for number in sorted(set(plt.get_fignums()) - before):
                    display(plt.figure(number))
            finally:
                for number in set(plt.get_fignums()) - before:
                    plt.close(number)
