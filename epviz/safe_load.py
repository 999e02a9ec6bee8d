"""Reading torch checkpoints without unpickling them: which globals a file needs, and readable messages.

epviz loads weights with ``torch.load(..., weights_only=True)`` (or safetensors) only. When a file
needs more than plain tensors, the error names the globals it would have to unpickle, found here
without running any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["is_torch_checkpoint", "strip_ansi", "unsafe_globals"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes (torch and nbclient wrap parts of their messages in them)."""
    return _ANSI.sub("", text)


def is_torch_checkpoint(path: str | Path) -> bool:
    """Whether `path` starts like a file ``torch.save`` writes: a zip archive, or a pickle of the legacy format.

    A text file, an image or a safetensors file renamed ``.pth`` does not; their decoding errors are then
    reported as "not a torch checkpoint" rather than as pickled objects epviz refuses.
    """
    with open(path, "rb") as file:
        head = file.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def unsafe_globals(path: str | Path, err: BaseException) -> list[str]:
    """The globals a pickled checkpoint needs beyond plain tensors, sorted, read without unpickling anything.

    Args:
        path: The checkpoint.
        err: The error ``torch.load(..., weights_only=True)`` raised on it (its message is the fallback
            for containers torch's scanner cannot read).
    """
    found: list[str] = []
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        try:
            found = [str(g) for g in scan(str(path))]
        except Exception:  # noqa: BLE001 - an older container format: fall back on the message
            found = []
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", strip_ansi(str(err)))
    return sorted(dict.fromkeys(found))
