"""Device and precision choices shared by every stage.

The device is picked automatically (CUDA when present, else CPU) unless the caller
or the ``EPVIZ_DEVICE`` environment variable names one.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from epviz.errors import ConfigError

__all__ = ["resolve_device", "resolve_precision", "autocast", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "auto")


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


def resolve_precision(device: torch.device, precision: str) -> str:
    """`precision` itself, or for "auto": "bf16" where `device` computes bf16 natively, else "fp32".

    bf16 autocast pays only on hardware with bf16 units: CUDA devices that support it, CPUs with AVX-512
    BF16 or AMX. Elsewhere it is emulated and slower than fp32 (measured on a 2-core AVX2 CPU, one
    training step: 3.3x fp32's for EP16, 10x for jepa; ``benchmarks/head_grid.py``), so "auto" trains in fp32 there.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 units (the avx512_bf16 or amx_bf16 flags of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """A context that runs matmuls in `precision` ("fp32", "bf16" or "auto", see :func:`resolve_precision`) on `device`."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
