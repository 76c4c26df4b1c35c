"""Writing files so that an interruption never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary_path)``, then rename it over ``path``: ``path`` is never half-written.

    If ``write`` raises, the temporary file is removed and the previous ``path`` stays intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename is atomic
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)  # no-op once renamed
