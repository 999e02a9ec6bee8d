"""Tidy result tables: the context columns every result row carries.

Every analysis and every training run reports one row per thing measured, with the context
columns ``backbone``, ``layer``, ``probe`` and ``seed`` first (filled from a ``context`` dict,
the probe's name and the tokens' origin), so results of many runs concatenate into one table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = ["CONTEXT_KEYS", "context_columns", "frame"]

CONTEXT_KEYS = ("backbone", "layer", "probe", "seed")


def context_columns(context: Mapping[str, Any] | None, probe: Any = None, tokens: Any = None) -> dict[str, Any]:
    """The context columns of a result row.

    ``backbone``, ``layer``, ``probe`` and ``seed`` are always present. Defaults: the probe's
    name, and ``backbone`` / ``layer`` from ``tokens.origin`` (set by token caches); anything
    still unknown is None. Values in `context` win, and extra keys become extra columns.
    """
    out: dict[str, Any] = dict.fromkeys(CONTEXT_KEYS)
    if tokens is not None:
        for key in ("backbone", "layer"):
            if getattr(tokens.origin, key) is not None:
                out[key] = getattr(tokens.origin, key)
    if probe is not None:
        out["probe"] = probe if isinstance(probe, str) else probe.name
    if context is not None:
        if not isinstance(context, Mapping):
            raise TypeError(f"context must be a dict of column values, got {type(context).__name__}")
        out.update(context)
    return out


def frame(rows: Sequence[Mapping[str, Any]], context: Mapping[str, Any], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A tidy DataFrame: the context columns first, then the rows' own columns."""
    records = [{**context, **row} for row in rows]
    order = list(context) + [c for c in (columns or (rows[0] if rows else [])) if c not in context]
    return pd.DataFrame(records, columns=order)
