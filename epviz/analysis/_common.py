"""Helpers shared by the analyses: device, the attentive-probe check (and the result-table helpers of :mod:`epviz.tables`)."""

from __future__ import annotations

import torch

from epviz.probes import Probe, available
from epviz.runtime import resolve_device
from epviz.tables import CONTEXT_KEYS, context_columns, frame

__all__ = ["CONTEXT_KEYS", "context_columns", "frame", "require_predictors", "attentive_probe_names", "prepare_probe"]


def attentive_probe_names() -> list[str]:
    """Registered probe families that have attention predictors."""
    return available(attentive=True, variants=False)


def require_predictors(probe: Probe, what: str) -> None:
    """Raise a ValueError when `probe` has no attention predictors (cls, gap).

    Args:
        probe: The probe to check.
        what: Name of the analysis, for the message.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"{what} expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    if probe.num_predictors == 0:
        raise ValueError(
            f"{what} is a per-predictor analysis, but probe '{probe.name}' has no attention predictors "
            f"(num_predictors == 0). Use an attentive probe: {', '.join(attentive_probe_names())}"
        )


def prepare_probe(probe: Probe, device: str | torch.device | None) -> torch.device:
    """Resolve the device and move `probe` there."""
    device = resolve_device(device)
    probe.to(device)
    return device
