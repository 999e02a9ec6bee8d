"""Bootstrap intervals over test images for the per-predictor measures and their rank correlations.

Definitions (ours):

* **Resampling unit**: one test image (its dataset position). A resample draws, with
  replacement, as many images as were measured, and every measure is recomputed from
  per-image records weighted by the draw counts (``counts @ records``), so no probe runs again.
  When meters measured different images (``index`` and ``localization_index``), images are
  drawn within each stratum of images measured by the same meters (e.g. "in both subsets",
  "in ``index`` only"): every meter keeps its number of images, and meters that measured the
  same image see the same count for it (paired resamples).
* **Counts**: ``numpy.random.default_rng(seed).multinomial(n, [1/n] * n)`` per stratum and
  resample; the same seed gives the same resamples.
* **Measures per resample**: accuracy and Δacc (every control) are weighted means of the
  per-image correctness of the full and the ablated predictions (the same images for both);
  MaxBoxAccV2 recomputes the box accuracy for every (tau, delta) from per-image box correctness
  and takes the best tau per delta *inside each resample* (the dataset-level rule), then the mean
  over delta; the in-box mass and the pointing game are weighted means.
* **Spearman ρ across predictors**: in each resample both per-predictor measures are
  recomputed and ρ is taken across the predictors; resamples where ρ is undefined (a constant
  measure) are left out and counted (``rho_undefined``).
* **Interval**: the percentile interval, ``level`` = 0.95 by default (2.5th and 97.5th
  percentiles of B = 1000 resamples).
* **Paired difference** (:func:`paired_difference`): the unit of a claim about probes or
  backbones is a trained head *and* the test images, so both vary: each resample draws the test
  images once (with replacement, the same draw for both arms: the comparison is paired on
  images) and, independently per arm, as many seeds as it has (with replacement), then takes the
  difference of the two arms' means. With one seed per arm only the images vary, and the
  interval says so (``seeds`` in the result). An interval covering 0 reads "not resolved".

Memory: draw counts are made for at most ``_WEIGHT_BUDGET`` = 2**22 numbers at a time
(16 MB as float32; with n images that is 2**22 // n resamples per chunk); MaxBoxAccV2 records
stay packed (K * T * 3 bits per image, 600 bytes for K = 16, T = 100) and are unpacked
``_UNPACK_BUDGET`` = 2**22 values at a time (16 MB as float32), for at most 2**22 / (K * T * 3)
resamples at a time; the result keeps B * K floats per column.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from epviz.analysis.meters import Meter
from epviz.analysis.stats import partial_rho, row_spearman, spearman
from epviz.checks import check_int, check_number

__all__ = [
    "Bootstrap",
    "Interval",
    "RhoInterval",
    "bootstrap_mean",
    "bootstrap_weights",
    "PairedDifference",
    "paired_difference",
    "group_means",
    "percentile_interval",
    "resample_box_accuracy",
    "resample_maxboxacc",
    "spearman_intervals",
    "weighted_mean",
]

N_BOOT = 1000
LEVEL = 0.95
_WEIGHT_BUDGET = 1 << 22
_UNPACK_BUDGET = 1 << 22


class Interval(NamedTuple):
    """A point estimate and its bootstrap interval."""

    estimate: float
    lo: float
    hi: float


class RhoInterval(NamedTuple):
    """Spearman ρ across predictors, its bootstrap interval, and the share of resamples where ρ is undefined."""

    rho: float
    lo: float
    hi: float
    undefined: float


def _check(n_boot: int, level: float) -> None:
    check_int("n_boot", n_boot, 1)
    check_number("level", level, 0, 1, open_low=True, open_high=True)


def bootstrap_weights(
    strata: int | Sequence[np.ndarray], n_boot: int = N_BOOT, seed: int = 0, size: int | None = None
) -> Iterator[np.ndarray]:
    """Bootstrap draw counts, a chunk of resamples at a time.

    Args:
        strata: The number n of images (one stratum), or per stratum the columns (indices into
            ``range(size)``) of its images; each stratum's images are drawn among themselves.
        n_boot: Number B of resamples.
        seed: Seed of ``numpy.random.default_rng``.
        size: Number of columns (default: n, or the largest stratum index + 1).

    Yields:
        float32 arrays (b, size) of counts, b <= B rows per chunk, B rows in all; every row gives
        each stratum as many draws as it has images.
    """
    _check(n_boot, 0.5)
    if isinstance(strata, (int, np.integer)):
        strata = [np.arange(int(strata))]
    strata = [np.asarray(s, dtype=np.int64) for s in strata]
    if size is None:
        size = max((int(s.max()) + 1 for s in strata if len(s)), default=0)
    if size == 0:
        raise ValueError("the bootstrap needs at least one image")
    rng = np.random.default_rng(seed)
    chunk = max(1, _WEIGHT_BUDGET // size)
    for start in range(0, int(n_boot), chunk):
        b = min(chunk, int(n_boot) - start)
        out = np.zeros((b, size), dtype=np.float32)
        for cols in strata:
            if len(cols):
                out[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=b)
        yield out


def weighted_mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per resample, the weighted mean over images: (b, n) weights, (n, ...) values -> (b, ...)."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)
    total = weights.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (weights.astype(np.float64) @ flat) / total
    return out.reshape((len(weights), *values.shape[1:]))


def resample_box_accuracy(packed: np.ndarray, shape: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """Box accuracy per (resample, predictor, tau, delta) from packed per-image box correctness.

    Args:
        packed: (n, ceil(K*T*D / 8)) uint8, each row ``np.packbits`` of an image's (K, T, D) correctness.
        shape: (K, T, D).
        weights: (b, n) image weights.

    Returns:
        (b, K, T, D) float64 accuracies: the weighted fraction of correct images.
    """
    k, t, d = (int(v) for v in shape)
    n, bits = len(packed), k * t * d
    if weights.shape[1] != n:
        raise ValueError(f"weights cover {weights.shape[1]} images, the box records {n}")
    total = np.zeros((len(weights), bits), dtype=np.float32)  # counts <= n: exact in float32 below 2**24
    step = max(1, _UNPACK_BUDGET // max(bits, 1))
    for start in range(0, n, step):
        part = np.unpackbits(packed[start : start + step], axis=1, count=bits).astype(np.float32)
        total += weights[:, start : start + step].astype(np.float32) @ part
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = total.astype(np.float64) / weights.sum(axis=1, keepdims=True)
    return acc.reshape(len(weights), k, t, d)


def resample_maxboxacc(packed: np.ndarray, shape: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """MaxBoxAccV2 per (resample, predictor): the best tau per delta chosen inside each resample, then the mean over delta.

    Args and records as in :func:`resample_box_accuracy`; resamples are taken a few at a time so
    that the (resamples, K, T, D) accuracies stay within ``_UNPACK_BUDGET`` values.
    """
    bits = max(1, int(np.prod(shape)))
    rows = max(1, _UNPACK_BUDGET // bits)
    parts = [
        resample_box_accuracy(packed, shape, weights[i : i + rows]).max(axis=2).mean(axis=2) for i in range(0, len(weights), rows)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, int(shape[0])))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of resampled values along axis 0, ignoring NaN (NaN when none is finite)."""
    _check(1, level)
    samples = np.asarray(samples, dtype=np.float64)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        lo, hi = np.nanpercentile(samples, q, axis=0)
    return lo, hi


class PairedDifference(NamedTuple):
    """Mean of arm a minus mean of arm b, its interval, and what varied in the resamples."""

    estimate: float
    lo: float
    hi: float
    seeds: tuple[int, int]
    images: int

    @property
    def verdict(self) -> str:
        """ "a > b", "a < b", or "not resolved" when the interval covers 0."""
        if self.lo > 0:
            return "a > b"
        if self.hi < 0:
            return "a < b"
        return "not resolved"


def paired_difference(
    a: Sequence | np.ndarray, b: Sequence | np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> PairedDifference:
    """Difference of two arms measured on the same test images, with an interval over seeds and images.

    Args:
        a, b: Per-image values of each arm, (seeds, images) (or (images,) for one seed); both arms
            hold the same images in the same order (e.g. per-image lift or correctness).
        n_boot, seed, level: Resamples, their seed and the interval level.

    Raises:
        ValueError: The arms do not hold the same number of images, or hold non-finite values.
    """
    _check(n_boot, level)
    arms = [np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (a, b)]
    if arms[0].shape[1] != arms[1].shape[1] or arms[0].shape[1] == 0:
        raise ValueError(f"both arms must hold the same test images: got {arms[0].shape[1]} and {arms[1].shape[1]} images")
    if not all(np.isfinite(x).all() for x in arms):
        raise ValueError("paired_difference got NaN or inf values")
    n = arms[0].shape[1]
    rng = np.random.default_rng([seed, 1])  # the seeds' draws: a stream apart from the images'
    samples = []
    for weights in bootstrap_weights(n, n_boot, seed):  # (chunk, n) image counts, shared by both arms
        per_image = []
        for x in arms:
            draw = rng.integers(0, len(x), size=(len(weights), len(x)))  # seeds drawn per arm
            per_image.append(x[draw].mean(1))  # (chunk, n)
        samples.append(((per_image[0] - per_image[1]) * weights).sum(1) / n)
    lo, hi = percentile_interval(np.concatenate(samples), level)
    estimate = float(arms[0].mean() - arms[1].mean())
    return PairedDifference(estimate, float(lo), float(hi), (len(arms[0]), len(arms[1])), n)


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of per-image values (e.g. correctness: the accuracy) and its bootstrap interval over images."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    _check(n_boot, level)
    samples = np.concatenate([weighted_mean(w, values) for w in bootstrap_weights(len(values), n_boot, seed)])
    lo, hi = percentile_interval(samples, level)
    return Interval(float(values.mean()), float(lo), float(hi))


def group_means(
    table: pd.DataFrame,
    by: Sequence[str],
    columns: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Per group, the mean of per-image columns and its bootstrap interval over the group's rows (images).

    Args:
        table: One row per image (e.g. per-image agreement scores), with the `by` and `columns` columns.
        by: The group columns.
        columns: The per-image values averaged; NaN values are left out of their column.
        n_boot, seed, level: Resamples, their seed and the interval level.

    Returns:
        One row per group: the `by` columns, then ``<column>``, ``<column>_lo``, ``<column>_hi`` and
        ``<column>_n`` (values averaged) for every column. Groups keep their first appearance's order.
    """
    missing = [c for c in [*by, *columns] if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table (columns: {list(table.columns)})")
    rows = []
    for key, part in table.groupby(list(by), sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for column in columns:
            values = part[column].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            interval = bootstrap_mean(values, n_boot, seed, level) if len(values) else Interval(np.nan, np.nan, np.nan)
            row.update(
                {column: interval.estimate, f"{column}_lo": interval.lo, f"{column}_hi": interval.hi, f"{column}_n": len(values)}
            )
        rows.append(row)
    return pd.DataFrame(rows)


class Bootstrap:
    """Bootstrap intervals of the columns of meters that kept per-image records, after one pass.

    Args:
        meters: Meters that ran (e.g. through :func:`~epviz.analysis.measure`); those whose
            :meth:`~epviz.analysis.Meter.positions` is None are left out.
        n_boot: Default number of resamples.
        seed: Default seed.
        level: Default interval level.
        context: Context columns of the measured probe (backbone, probe, ...), for tables.
    """

    def __init__(
        self, meters: Sequence[Meter], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL, context: Mapping | None = None
    ) -> None:
        _check(n_boot, level)
        self.meters = [m for m in meters if m.positions() is not None]
        self.n_boot, self.seed, self.level = int(n_boot), int(seed), float(level)
        self.context = dict(context or {})
        self._cache: dict[tuple[int, int], dict[str, pd.DataFrame]] = {}
        self._points: pd.DataFrame | None = None

    def _predictors(self, meter: Meter) -> np.ndarray:
        return meter.summary()["predictor"].to_numpy()

    def points(self) -> pd.DataFrame:
        """The meters' summaries joined on ``predictor`` (the point estimates)."""
        if self._points is None:
            table = None
            for meter in self.meters:
                part = meter.summary().drop(columns=["n_images"], errors="ignore")
                keep = ["predictor", *(c for c in part.columns if c != "predictor" and (table is None or c not in table))]
                table = part[keep] if table is None else table.merge(part[keep], on="predictor", how="outer")
            self._points = pd.DataFrame({"predictor": []}) if table is None else table
        return self._points

    def samples(self, n_boot: int | None = None, seed: int | None = None) -> dict[str, pd.DataFrame]:
        """Every resampled column: a (B, predictors) DataFrame whose columns are the predictor indices."""
        n_boot = self.n_boot if n_boot is None else int(n_boot)
        seed = self.seed if seed is None else int(seed)
        key = (n_boot, seed)
        if key not in self._cache:
            self._cache[key] = self._draw(n_boot, seed)
        return self._cache[key]

    def _draw(self, n_boot: int, seed: int) -> dict[str, pd.DataFrame]:
        if not self.meters:
            return {}
        positions = [np.asarray(m.positions()) for m in self.meters]
        union, inverse = np.unique(np.concatenate(positions), return_inverse=True)
        cols, start = [], 0
        for p in positions:
            cols.append(inverse[start : start + len(p)])
            start += len(p)
        member = np.zeros((len(union), len(self.meters)), dtype=bool)
        for i, c in enumerate(cols):
            member[c, i] = True
        _, stratum = np.unique(member, axis=0, return_inverse=True)
        strata = [np.flatnonzero(stratum.reshape(-1) == s) for s in range(int(stratum.max()) + 1)]
        parts: dict[str, list[np.ndarray]] = {}
        owner: dict[str, int] = {}  # a column two meters resample is taken from the first one
        for weights in bootstrap_weights(strata, n_boot, seed, size=len(union)):
            for i, (meter, c) in enumerate(zip(self.meters, cols)):
                for column, values in meter.resample(weights[:, c]).items():
                    if owner.setdefault(column, i) == i:
                        parts.setdefault(column, []).append(np.asarray(values, dtype=np.float64))
        return {
            column: pd.DataFrame(np.concatenate(parts[column]), columns=self._predictors(self.meters[i]))
            for column, i in owner.items()
        }

    def intervals(self, n_boot: int | None = None, seed: int | None = None, level: float | None = None) -> pd.DataFrame:
        """One row per predictor: ``<column>_lo`` and ``<column>_hi`` for every resampled column."""
        level = self.level if level is None else float(level)
        table = pd.DataFrame({"predictor": self.points()["predictor"].to_numpy()})
        for column, frame in self.samples(n_boot, seed).items():
            lo, hi = percentile_interval(frame.to_numpy(), level)
            part = pd.DataFrame({"predictor": frame.columns.to_numpy(), f"{column}_lo": lo, f"{column}_hi": hi})
            table = table.merge(part, on="predictor", how="left")
        return table

    def spearman(
        self,
        x: str,
        y: str,
        n_boot: int | None = None,
        seed: int | None = None,
        level: float | None = None,
        given: str | None = None,
    ) -> RhoInterval:
        """Spearman ρ of columns `x` and `y` across predictors (partial, `given` a third column), with its interval.

        Raises:
            KeyError: A column has no per-image records here.
        """
        level = self.level if level is None else float(level)
        samples = self.samples(n_boot, seed)
        columns = [x, y] + ([given] if given else [])
        missing = [c for c in columns if c not in samples]
        if missing:
            raise KeyError(f"no bootstrap records for {missing}; resampled columns: {sorted(samples)}")
        both = [p for p in samples[x].columns if all(p in set(samples[c].columns) for c in columns[1:])]
        points = self.points().set_index("predictor").loc[both]

        def rho_of(a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
            return np.asarray(spearman(points[a], points[b]).rho), row_spearman(
                samples[a][both].to_numpy(), samples[b][both].to_numpy()
            )

        (rho, rhos) = rho_of(x, y)
        if given:
            (xz, xzs), (yz, yzs) = rho_of(x, given), rho_of(y, given)
            rho, rhos = partial_rho(rho, xz, yz), partial_rho(rhos, xzs, yzs)
        undefined = float(np.isnan(rhos).mean())
        lo, hi = percentile_interval(rhos, level)
        return RhoInterval(float(rho), float(lo), float(hi), undefined)


def spearman_intervals(
    records: Mapping[object, Bootstrap],
    pairs: Sequence[tuple[str, str] | tuple[str, str, str]],
    n_boot: int | None = None,
    seed: int | None = None,
    level: float | None = None,
) -> pd.DataFrame:
    """Spearman ρ across predictors, with its interval, for several column pairs and many probes.

    Args:
        records: Per probe (e.g. the ``(backbone, label)`` keys of the bootstraps
            :func:`~epviz.analysis.predictor_tables` returns), its :class:`Bootstrap`.
        pairs: The (x, y) column pairs; an (x, y, z) triple gives the partial ρ of x and y given z.
        n_boot, seed, level: As in :meth:`Bootstrap.spearman` (default: each Bootstrap's own).

    Returns:
        One row per (probe, pair): the Bootstrap's context columns, ``x``, ``y``, ``given`` (None: plain ρ), ``rho``,
        ``rho_lo``, ``rho_hi``, ``rho_undefined`` (share of resamples where ρ is undefined),
        ``predictors``. A probe lacking records of a pair's column (e.g. a meter it did not run)
        has no row for that pair.

    Raises:
        KeyError: No probe has records of both columns of a pair.
    """
    rows, found = [], set()
    for bootstrap in records.values():
        samples = bootstrap.samples(n_boot, seed)
        for pair in pairs:
            x, y, given = (*pair, None)[:3]
            if any(c not in samples for c in pair):
                continue
            found.add(tuple(pair))
            r = bootstrap.spearman(x, y, n_boot, seed, level, given=given)
            rows.append(
                {
                    **bootstrap.context,
                    "x": x,
                    "y": y,
                    "given": given,
                    "rho": r.rho,
                    "rho_lo": r.lo,
                    "rho_hi": r.hi,
                    "rho_undefined": r.undefined,
                    "predictors": samples[x].shape[1],
                }
            )
    missing = [pair for pair in pairs if tuple(pair) not in found]
    if missing:
        raise KeyError(f"no probe has bootstrap records for both columns of {missing}")
    return pd.DataFrame(rows)
