"""Helpers shared by the analyses: result context, device, the attentive-probe check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from epviz.probes.base import Probe
from epviz.probes.registry import available, probe_class
from epviz.runtime import resolve_device
from epviz.tokenset import TokenSet

__all__ = ["CONTEXT_KEYS", "context_columns", "frame", "require_predictors", "attentive_probe_names", "prepare_probe"]

CONTEXT_KEYS = ("backbone", "layer", "probe", "seed")


def attentive_probe_names() -> list[str]:
    """Registered probes that have attention predictors (those that override ``num_predictors``)."""
    return [n for n in available() if probe_class(n).num_predictors is not Probe.num_predictors]


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


def context_columns(context: Mapping | None, probe: Probe | str | None = None, tokens: TokenSet | None = None) -> dict:
    """The context columns of a result row.

    ``backbone``, ``layer``, ``probe`` and ``seed`` are always present. Defaults: the probe's
    name, and ``backbone`` / ``layer`` from ``tokens.info`` (set by token caches); anything
    still unknown is None. Values in `context` win, and extra keys become extra columns.
    """
    out: dict = {k: None for k in CONTEXT_KEYS}
    if tokens is not None:
        for key in ("backbone", "layer"):
            if tokens.info.get(key) is not None:
                out[key] = tokens.info[key]
    if probe is not None:
        out["probe"] = probe if isinstance(probe, str) else probe.name
    if context is not None:
        if not isinstance(context, Mapping):
            raise TypeError(f"context must be a dict of column values, got {type(context).__name__}")
        out.update(context)
    return out


def frame(rows: Sequence[dict], context: dict, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A tidy DataFrame: the context columns first, then the rows' own columns."""
    records = [{**context, **row} for row in rows]
    order = list(context) + [c for c in (columns or (rows[0] if rows else [])) if c not in context]
    return pd.DataFrame(records, columns=order)


def prepare_probe(probe: Probe, device: str | torch.device | None) -> torch.device:
    """Resolve the device and move `probe` there."""
    device = resolve_device(device)
    probe.to(device)
    return device

