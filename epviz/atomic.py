"""Atomic file writes: write to a temporary file beside the target, then rename it into place.

A reader never sees a half-written file, and a failed write leaves nothing behind. The file gets the
permissions a plain ``open(target, "w")`` would give it (those of the file it replaces, else the umask's),
not the owner-only mode of a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to `target`.

    Args:
        target: The final path (its folder is created if needed).
        write: Writes the whole content to the path it is given.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _plain_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _plain_mode(target: Path) -> int:
    """The mode of the file being replaced, or that of a new file under the process's umask."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write `text` to `target` atomically."""
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))
