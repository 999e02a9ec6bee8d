"""Rank correlation, the one Spearman of the analyses and figures."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = ["Spearman", "row_spearman", "spearman"]


class Spearman(NamedTuple):
    """Spearman rank correlation and its two-sided p-value (both NaN when undefined)."""

    rho: float
    p_value: float


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Spearman:
    """Spearman rank correlation of `x` and `y` (ties get their average rank).

    Undefined, hence NaN, for fewer than two pairs or when either input is constant.

    Raises:
        ValueError: `x` and `y` differ in length.
    """
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of the same length, got {len(x)} and {len(y)}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Spearman(float("nan"), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.spearmanr(x, y)
    return Spearman(float(result.statistic), float(result.pvalue))


def partial_rho(xy: np.ndarray | float, xz: np.ndarray | float, yz: np.ndarray | float) -> np.ndarray:
    """The correlation of x and y given z from the three pairwise ones (on ranks: partial Spearman).

    ρ_xy·z = (ρ_xy − ρ_xz ρ_yz) / √((1 − ρ_xz²)(1 − ρ_yz²)); NaN where z explains x or y entirely.
    """
    xy, xz, yz = (np.asarray(v, dtype=np.float64) for v in (xy, xz, yz))
    denom = np.sqrt((1 - xz**2) * (1 - yz**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (xy - xz * yz) / denom
    return np.clip(np.where(denom > 0, rho, np.nan), -1.0, 1.0)


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of `a` with the same row of `b` (NaN for a constant row).

    Args:
        a: Values (..., n).
        b: Values of the same shape.

    Returns:
        One correlation per row, shape ``a.shape[:-1]``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"row_spearman needs arrays of the same shape, got {a.shape} and {b.shape}")
    ra = stats.rankdata(a, axis=-1)
    rb = stats.rankdata(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    denom = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-1) / denom
    rho = np.where(denom == 0, np.nan, rho)
    return np.clip(rho, -1.0, 1.0)
