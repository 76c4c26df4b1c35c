"""Runtime profiles: one environment variable picks how big every run is.

``PKM_REF_PROFILE`` = ``smoke`` (tests and CI: every code path at tiny sizes), ``cpu`` (a real but
short run on a few cores) or ``gpu`` (the full reproduction). Unset, it follows the hardware:
``gpu`` when CUDA is available, else ``cpu``. Tests force ``smoke``.

A profile also picks the default device of every command and notebook (``profile_device``): the
GPU for ``gpu``, the CPU for the others. Notebooks and commands choose their sizes with
``by_profile``:

    n_keys = by_profile(smoke=16, cpu=128, gpu=512)
"""

from __future__ import annotations

import argparse
import os
from typing import TypeVar

import torch

PROFILES = ("smoke", "cpu", "gpu")
ENV_VAR = "PKM_REF_PROFILE"
T = TypeVar("T")


def default_profile() -> str:
    """``gpu`` when CUDA is available, else ``cpu``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def current_profile() -> str:
    """The profile named by ``PKM_REF_PROFILE``, or ``default_profile()`` when unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or default_profile()
    if name not in PROFILES:
        raise ValueError(
            f"{ENV_VAR} must be one of {list(PROFILES)}, got {name!r}: set it to one of them, "
            "or unset it for the hardware's (gpu with CUDA, else cpu)"
        )
    return name


def by_profile(smoke: T, cpu: T, gpu: T, profile: str | None = None) -> T:
    """The value for ``profile`` (default: ``current_profile()``)."""
    profile = current_profile() if profile is None else profile
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[profile]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None = None) -> torch.device:
    """The device that ``name`` asks for: None or ``"auto"`` is ``default_device()``.

    Every command and config resolves its device here, so a device torch does not know, or CUDA
    on a machine without a GPU, fails at once with a message naming the value.
    """
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or another torch device, got {name!r}"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for, but torch sees no CUDA device here; "
            "use 'cpu', or 'auto' to take a GPU when there is one"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} was asked for, but torch sees only "
            f"{torch.cuda.device_count()} CUDA device(s) here"
        )
    if device.type == "meta":
        raise ValueError(f"device {name!r} holds shapes, not numbers: nothing to train or time")
    if device.type not in ("cpu", "cuda"):  # e.g. xpu or mps: can this torch use it at all?
        try:
            torch.empty(0, device=device)
        except Exception as error:  # AssertionError, NotImplementedError, ... by backend
            raise ValueError(
                f"device {name!r} was asked for, but this torch cannot use it ({error})"
            ) from None
    return device


def profile_device_name(profile: str) -> str:
    """The profile's own hardware, as a device name: ``"auto"`` (a GPU when there is one) for
    ``gpu``, ``"cpu"`` for ``smoke`` and ``cpu``.

    Results are filed by profile (``results/cpu/``, ``results/gpu/``; the committed reference in
    ``figures/`` and ``figures/gpu/``), so a cpu run on a machine with a GPU still measures the
    CPU unless told otherwise.
    """
    return "auto" if profile == "gpu" else "cpu"


def profile_device(profile: str, name: str | None = None) -> torch.device:
    """The device of a run at ``profile``: ``name`` when given, else ``profile_device_name``."""
    return resolve_device(name if name is not None else profile_device_name(profile))


def add_device_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, scope: str = ""
) -> None:
    """The ``--device`` option of the commands that run at a profile (see ``profile_device``);
    ``scope`` says what it applies to where that is not everything."""
    parser.add_argument(
        "--device",
        default=None,
        help=f'{scope}"cpu", "cuda", "cuda:1", "auto" (CUDA when available); default: the '
        "profile's, the GPU for gpu when there is one, else the CPU",
    )


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--profile`` option every command shares; ``None`` means ``current_profile()``."""
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help=f"runtime profile (default: ${ENV_VAR}, else gpu with CUDA, else cpu)",
    )


def add_seed_arguments(parser: argparse.ArgumentParser, default_count: str) -> None:
    """``--seed`` (the first seed) and ``--seeds`` (how many: --seed, --seed + 1, ...), shared by
    the commands that train every model with several seeds; ``default_count`` says how many
    without ``--seeds``. Read them back with ``seeds_from_args``."""
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument(
        "--seeds", type=int, default=None, metavar="N",
        help=f"seeds per model: --seed, --seed + 1, ... (default: {default_count})",
    )  # fmt: skip


def seeds_from_args(args: argparse.Namespace, default_count: int) -> range:
    """The seeds that ``add_seed_arguments``' options name: ``default_count`` of them from
    ``--seed`` unless ``--seeds`` says how many."""
    count = default_count if args.seeds is None else args.seeds
    if count < 1:
        raise ValueError(f"--seeds must be >= 1, got {count}")
    return range(args.seed, args.seed + count)
