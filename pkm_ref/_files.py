"""Writing files so that an interruption never leaves half of one, and checking where they go
before the work that produces them starts."""

from __future__ import annotations

import os
import shutil
import tempfile
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


def check_writable(folder: str | os.PathLike[str], remedy: str) -> Path:
    """Return ``folder`` if files can be written in it, else raise an ``OSError`` naming it and
    ending with ``remedy`` (e.g. "choose another --out").

    Called before an hour of training or measuring, not after it. Creates nothing: a folder that
    does not exist yet is checked where it would be made, at its nearest existing parent (a file
    there, or a parent that refuses a new entry, fails).
    """
    folder = Path(folder)
    nearest = next(path for path in (folder, *folder.parents) if path.exists())
    if not nearest.is_dir():
        where = "" if nearest == folder else f"cannot write to {folder}: "
        raise NotADirectoryError(f"{where}{nearest} is a file, not a folder; {remedy}")
    try:
        with tempfile.TemporaryFile(dir=nearest):  # the only sure test, also for root
            pass
    except OSError as error:
        raise type(error)(f"cannot write to {folder} ({error.strerror}); {remedy}") from None
    return folder


def outermost_missing(folder: str | os.PathLike[str]) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet: what writing into
    ``folder`` will create (None when ``folder`` exists)."""
    folder = Path(folder)
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    return missing[-1] if missing else None


def remove_created(folder: str | os.PathLike[str], created: Path | None) -> None:
    """Undo ``folder`` when it is new: remove it, then its parents up to ``created`` (from
    ``outermost_missing`` before it was made) while they are empty. Nothing that existed before
    is removed."""
    if created is None:
        return
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == created.parent or not parent.exists():
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
