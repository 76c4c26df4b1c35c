"""Argument checks shared by the public API.

Every public function validates its inputs up front, so a bad value fails at once with a message
that names the parameter and the value, instead of an opaque shape error from deep inside torch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int if it is an integer >= 1, else raise naming ``name``.

    Any exact integer counts (``int``, ``numpy.int64``, a 0-d integer tensor): whatever has
    ``__index__``. Floats, bools and tensors with elements along a dimension do not.
    """
    number = _exact_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int if it is an integer >= 0 (see ``positive_int``)."""
    number = _exact_int(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def _exact_int(name: str, value: object) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        number = None  # a one-element (n,) tensor or a bool tensor has __index__ too
    if isinstance(value, bool) or number is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return number


def even_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive even integer (split into two halves)."""
    number = positive_int(name, value)
    if number % 2:
        raise ValueError(f"{name} must be even (the query is split into two halves), got {number}")
    return number


def probability(name: str, value: object) -> float:
    """Return ``value`` if it is a float in [0, 1), else raise (used for dropout rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def one_of(name: str, value: object, choices: Sequence[object]) -> object:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def tensor(name: str, value: object) -> torch.Tensor:
    """Return ``value`` if it is a tensor, else raise naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: torch.Tensor) -> torch.Tensor:
    """Return ``value`` if it has a floating dtype (scores must be differentiable)."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    return value


# The dtypes torch.autocast casts to its own before a matmul (it leaves float64 alone).
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def same_dtype(
    name: str, value: torch.Tensor, other_name: str, other: torch.Tensor
) -> torch.Tensor:
    """Return ``value`` if it is floating with ``other``'s dtype (keys and their query, an input
    and a layer's weights), else raise naming both. Under ``torch.autocast`` a 16-bit tensor may
    meet float32 on purpose: autocast casts both before the matmul."""
    floating(name, value)
    if value.dtype == other.dtype:  # the usual case: nothing more to ask on every forward
        return value
    mixed_by_autocast = (
        value.dtype in _AUTOCAST_DTYPES
        and other.dtype in _AUTOCAST_DTYPES
        and torch.is_autocast_enabled(other.device.type)
    )
    if not mixed_by_autocast:
        raise TypeError(
            f"{name} ({value.dtype}) must have the dtype of {other_name} ({other.dtype}); "
            "only torch.autocast mixes float16, bfloat16 and float32: cast one to the other"
        )
    return value


def knn_within(knn: object, limit: int, what: str) -> int:
    """Return ``knn`` if 1 <= knn <= limit, else raise saying what bounds it."""
    number = positive_int("knn", knn)
    if number > limit:
        raise ValueError(f"knn must be <= {what} ({limit}), got {number}")
    return number


def distinct_seeds(seeds: Iterable[int]) -> tuple[int, ...]:
    """``seeds`` as a tuple if it holds one seed at least and none twice (a seed repeated would
    count one model twice in an interval), else raise naming them."""
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    return seeds
