"""Device and precision choices shared by every stage.

The device is picked automatically (CUDA when present, else CPU) unless the caller
or the ``EPVIZ_DEVICE`` environment variable names one.
"""

from __future__ import annotations

import contextlib
import os

import torch

from epviz.errors import ConfigError

__all__ = ["resolve_device", "autocast", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    Args:
        device: An explicit choice ("cpu", "cuda", "cuda:1", a torch.device); None picks
            ``$EPVIZ_DEVICE`` if set, else CUDA when available, else CPU.
    """
    if device is None:
        device = os.environ.get("EPVIZ_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA device is available; use device='cpu'")
    return device


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """A context that runs matmuls in `precision` ("fp32" or "bf16") on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
