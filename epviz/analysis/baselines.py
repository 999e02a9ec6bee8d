"""Trivial attention maps: the chance lines every localization score is read against.

A localization score means little on its own: on a dataset whose objects sit near the centre, a
map that ignores the image already scores well. Three trivial maps, scored with exactly the
measures of :mod:`epviz.analysis.localization` on the same GT boxes (definitions ours):

* **uniform**: 1/N on every patch token. Its in-box mass is the boxes' area fraction (the
  ``chance_mass``); a constant map yields no box at any threshold, so its MaxBoxAccV2 is 0; its
  pointing is reported as NaN, since every token ties for the argmax (the random maps' pointing
  is the pointing chance).
* **centre prior**: an isotropic Gaussian centred on the image centre, evaluated at the patch
  centres and normalised to sum 1; its standard deviation along each axis is ``sigma_fraction``
  (default 0.25, a quarter) of the grid's side along that axis. The same map for every image.
* **random, matched entropy**: per image, ``softmax(z / T)`` of seeded i.i.d. standard Gaussian
  noise ``z`` over the N tokens (``numpy.random.default_rng(seed)``), one temperature ``T`` for
  the whole set, found by bisection on ``log T`` so that the mean over images of the entropy
  divided by ``log N`` equals a target (within ``tol``, default 1e-4). The target is a probe's
  mean normalised entropy (the mean of its predictors' ``entropy_norm``), so the random maps are
  as peaked as the probe's but placed at random; their argmax is a uniformly random patch, so
  their pointing score is the pointing chance. MaxBoxAccV2 min-max normalises a map and pointing
  reads its argmax, so both barely depend on the temperature: the entropy matters mostly for the
  in-box mass and for reading the maps side by side.

* **pixel salience, matched entropy**: per image, ``softmax(log(b) / T)`` of each patch's mean
  pixel intensity ``b`` (the image as the dataset gives it, channels averaged), with one
  temperature for the whole set matched to the probe's mean normalised entropy as above. It
  keeps the image's spatial order and knows nothing but brightness: on the canvases, where the
  item is the bright object by design, it is the honest chance line of every localization score.

A fourth reference is not a map but a probe: **untrained probe**, the same probe family freshly
initialised (several seeds), its maps on the same tokens. It says what the tokens alone give a
probe's maps before any training. Because MaxBoxAccV2 min-max normalises each map, a map that is
uniform to five decimals still has an order of values, and where that order follows the object the
untrained map scores well: on the zoo's random-init backbone an untrained EP16 scores as well as the
trained one (README, findings, "Before training"). :func:`untrained_probe_baselines` measures it,
and, given a target entropy, the same maps sharpened to the probe's entropy (``softmax(log(p) / T)``
of each untrained map p, one T for the set): **untrained probe, matched entropy**, the order of the
untrained head at the trained head's peakedness.

:func:`localization_baselines` scores the three maps at once (they are three "predictors" of one
pass of :func:`~epviz.analysis.localization.localization_from_maps`) and returns one row per
baseline; :func:`matched_entropy_baselines` gives the entropy-matched baseline of every probe of a
predictor table. Their tables feed ``delta_acc_panels(..., baselines=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from epviz.analysis.boxes import box_source, mask_source
from epviz.analysis.entropy import map_entropy
from epviz.analysis.localization import DELTAS, localization_from_maps
from epviz.data import GroundTruthBoxes, ImageDataset
from epviz.evaluate import collect_attention
from epviz.probes import build
from epviz.tables import context_columns, frame
from epviz.tokens import TokenSet

__all__ = [
    "BASELINES",
    "CENTRE_PRIOR",
    "MATCHED",
    "SALIENCE",
    "UNTRAINED_MATCHED",
    "SIGMA_FRACTION",
    "UNIFORM",
    "UNTRAINED",
    "centre_prior_maps",
    "localization_baselines",
    "matched_entropy_baselines",
    "matched_entropy_maps",
    "patch_brightness",
    "sharpen_maps",
    "temperature_for_entropy",
    "uniform_maps",
    "untrained_probe_baselines",
]

UNIFORM = "uniform"
CENTRE_PRIOR = "centre prior"
MATCHED = "random, matched entropy"
UNTRAINED = "untrained probe"
SALIENCE = "pixel salience, matched entropy"
UNTRAINED_MATCHED = "untrained probe, matched entropy"
BASELINES = (UNIFORM, CENTRE_PRIOR, MATCHED, SALIENCE)
SIGMA_FRACTION = 0.25
_LOG_T_RANGE = (-12.0, 12.0)  # bisection bracket of log T


def _tokens(grid: Sequence[int]) -> int:
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) of positive integers, got {tuple(grid)}")
    return rows * cols


def uniform_maps(n: int, num_tokens: int) -> np.ndarray:
    """(n, N) maps of 1/N everywhere."""
    return np.full((int(n), int(num_tokens)), 1.0 / int(num_tokens))


def centre_prior_maps(n: int, grid: Sequence[int], sigma_fraction: float = SIGMA_FRACTION) -> np.ndarray:
    """(n, N) copies of a centred Gaussian over the patch grid (row-major tokens), summing to 1.

    Args:
        n: Number of images.
        grid: Patch grid (rows, cols).
        sigma_fraction: Standard deviation along each axis as a fraction of the grid's side along it.
    """
    if not sigma_fraction > 0:
        raise ValueError(f"sigma_fraction must be positive, got {sigma_fraction}")
    rows, cols = (int(g) for g in grid)
    _tokens(grid)
    r = (np.arange(rows) + 0.5 - rows / 2) / (sigma_fraction * rows)  # patch centres in units of sigma
    c = (np.arange(cols) + 0.5 - cols / 2) / (sigma_fraction * cols)
    prior = np.exp(-0.5 * (r[:, None] ** 2 + c[None, :] ** 2)).reshape(-1)
    return np.broadcast_to(prior / prior.sum(), (int(n), rows * cols)).copy()


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def _mean_entropy_norm(maps: np.ndarray) -> float:
    return float(map_entropy(maps).mean() / math.log(maps.shape[-1]))


def temperature_for_entropy(logits: np.ndarray, target: float, tol: float = 1e-4, max_iter: int = 200) -> float:
    """The temperature T at which ``softmax(logits / T)`` has mean normalised entropy `target`.

    The mean entropy grows monotonically with T, so a bisection on ``log T`` finds it.

    Args:
        logits: (n, N) scores, N >= 2, not constant along the last axis.
        target: Mean entropy / log N, in (0, 1).
        tol: Accepted absolute error on the mean normalised entropy.
        max_iter: Bisection steps at most.

    Raises:
        ValueError: The target is outside (0, 1), or the bracket cannot reach it within `tol`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (images, tokens) with at least 2 tokens, got shape {logits.shape}")
    if not 0 < target < 1:
        raise ValueError(f"the target normalised entropy must lie in (0, 1) for random maps, got {target}")
    lo, hi = _LOG_T_RANGE
    h_lo, h_hi = _mean_entropy_norm(_softmax(logits, math.exp(lo))), _mean_entropy_norm(_softmax(logits, math.exp(hi)))
    if not h_lo - tol <= target <= h_hi + tol:
        raise ValueError(f"a normalised entropy of {target} is out of reach of these logits ({h_lo:.4f} to {h_hi:.4f})")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        h = _mean_entropy_norm(_softmax(logits, math.exp(mid)))
        if abs(h - target) <= tol:
            return math.exp(mid)
        lo, hi = (mid, hi) if h < target else (lo, mid)
    raise ValueError(f"the bisection did not reach a normalised entropy of {target} within {tol}")


def matched_entropy_maps(n: int, num_tokens: int, target: float, *, seed: int = 0, tol: float = 1e-4) -> tuple[np.ndarray, float]:
    """(n, N) random maps whose mean normalised entropy is `target`, and their temperature.

    Args:
        n: Number of images.
        num_tokens: N.
        target: Mean entropy / log N of the maps, in [0, 1]; 1 gives uniform maps, 0 one-hot maps at
            the noise's argmax. Any other target keeps the noise's order, however close to 1.
        seed: Seed of the Gaussian noise (the same seed gives the same noise whatever the target).
        tol: Accepted absolute error on the mean normalised entropy.

    Returns:
        The maps and the temperature T (``inf`` for target 1, 0 for target 0).
    """
    logits = np.random.default_rng(seed).standard_normal((int(n), int(num_tokens)))
    if not 0 <= target <= 1 or not np.isfinite(target):
        raise ValueError(f"a normalised entropy lies in [0, 1], got {target}")
    if target >= 1:
        return uniform_maps(n, num_tokens), math.inf
    if target <= 0:
        return np.eye(int(num_tokens))[logits.argmax(-1)], 0.0
    temperature = temperature_for_entropy(logits, target, tol)
    return _softmax(logits, temperature), temperature


def _boxes_and_size(boxes, image_size, index) -> tuple[list, int | Sequence[int], list | None]:
    """(boxes, image size, masks or None) of the images at `index`."""
    if isinstance(boxes, (ImageDataset, GroundTruthBoxes)):
        size = image_size if image_size is not None else boxes.image_size
        source, masks_of = box_source(boxes), mask_source(boxes)
        index = range(len(boxes)) if index is None else index
        masks = None if masks_of is None else [masks_of(int(i)) for i in index]
        return [source(int(i)) for i in index], size, masks
    if image_size is None:
        raise ValueError("pass image_size=(height, width): the boxes do not say the size of their images")
    boxes = list(boxes)
    return (boxes if index is None else [boxes[int(i)] for i in index]), image_size, None


def patch_brightness(dataset, grid: Sequence[int], index: Sequence[int] | None = None) -> np.ndarray:
    """(n, N) mean pixel intensity of every patch (channels averaged) of the dataset's images at `index`."""
    index = range(len(dataset)) if index is None else index
    rows = []
    for i in index:
        image = torch.as_tensor(dataset[int(i)][0], dtype=torch.float64)
        rows_, cols_ = (int(g) for g in grid)
        rows.append(F.adaptive_avg_pool2d(image.mean(0, keepdim=True), (rows_, cols_)).reshape(-1))
    return torch.stack(rows).numpy() if rows else np.zeros((0, _tokens(grid)))


def sharpen_maps(maps: np.ndarray, target: float) -> tuple[np.ndarray, float]:
    """(n, N) maps as softmax(log(maps) / T), one T for the set, at mean normalised entropy `target`; and T.

    The order of every map is kept; only its peakedness changes.
    """
    logits = np.log(np.clip(maps, 1e-300, None))
    if target >= 1:
        return uniform_maps(len(maps), maps.shape[-1]), math.inf
    temperature = temperature_for_entropy(logits, target)
    return _softmax(logits, temperature), temperature


def _score(
    maps: dict[str, np.ndarray],
    boxes: list,
    grid,
    image_size,
    thresholds,
    deltas,
    batch_size,
    convention: str = "epviz",
    masks: list | None = None,
) -> pd.DataFrame:
    stack = np.stack(list(maps.values()), axis=1).astype(np.float32)  # (n, baselines, N): one pass, one "predictor" each
    summary = localization_from_maps(
        stack,
        boxes,
        grid,
        image_size,
        thresholds=thresholds,
        deltas=deltas,
        batch_size=batch_size,
        convention=convention,
        masks=masks,
    )
    own = [c for c in summary.columns if c not in context_columns(None)]
    summary = summary[own].drop(columns="predictor")
    entropy = map_entropy(stack).mean(0)  # (baselines,)
    summary.insert(0, "baseline", list(maps))
    return summary.assign(entropy=entropy, entropy_norm=entropy / math.log(stack.shape[-1]))


def localization_baselines(
    boxes,
    grid: Sequence[int],
    image_size: int | Sequence[int] | None = None,
    *,
    target_entropy: float | None = None,
    sigma_fraction: float = SIGMA_FRACTION,
    seed: int = 0,
    index: Sequence[int] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    convention: str = "epviz",
    deltas: Sequence[float] = DELTAS,
    context: Mapping | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The localization scores of the trivial maps on a dataset's GT boxes, one row per baseline.

    Args:
        boxes: Per image, its GT boxes ((k, 4) or (4,), xyxy pixels, exclusive x1, y1), or a dataset
            with boxes (see :func:`~epviz.analysis.localization.box_source`).
        grid: Patch grid (rows, cols) of the maps they stand in for.
        image_size: Image (height, width) or side; default the dataset's ``image_size``.
        target_entropy: Mean normalised entropy of the random and salience maps; None leaves them out
            (the salience map also needs `boxes` to be the dataset, whose images it reads).
        sigma_fraction: The centre prior's standard deviation, as a fraction of the grid's side.
        seed: Seed of the random maps' noise.
        index: Images of the dataset to use (default all), e.g. the ``localization_index`` of the probes.
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01): pass the probes' own.
        convention: MaxBoxAccV2 convention, "epviz" or "wsol" (see :mod:`epviz.analysis.localization`): the probes' own.
        deltas: IoU thresholds (default 0.3, 0.5, 0.7).
        context: Values of the context columns (backbone, layer, probe, seed).
        batch_size: Images processed together.

    Returns:
        Context columns, then ``baseline`` (``uniform``, ``centre prior``, ``random, matched entropy``)
        and the localization columns of :func:`~epviz.analysis.localization.localization_from_maps`
        (maxboxacc_v2, its per-IoU parts and best taus, inbox_mass, inbox_mass_std, chance_mass,
        pointing (NaN for the uniform map), n_images), entropy, entropy_norm, and the parameters: sigma_fraction (centre prior),
        target_entropy_norm, temperature and map_seed (random maps).
    """
    dataset = boxes if isinstance(boxes, ImageDataset) else None
    boxes, image_size, masks = _boxes_and_size(boxes, image_size, index)
    n, num_tokens = len(boxes), _tokens(grid)
    if n == 0:
        raise ValueError("there are no boxes to score the baselines on")
    maps = {UNIFORM: uniform_maps(n, num_tokens), CENTRE_PRIOR: centre_prior_maps(n, grid, sigma_fraction)}
    params = {UNIFORM: {}, CENTRE_PRIOR: dict(sigma_fraction=float(sigma_fraction))}
    if target_entropy is not None:
        maps[MATCHED], temperature = matched_entropy_maps(n, num_tokens, float(target_entropy), seed=seed)
        params[MATCHED] = dict(target_entropy_norm=float(target_entropy), temperature=temperature, map_seed=int(seed))
        if dataset is not None:  # the images are at hand: the salience map
            brightness = patch_brightness(dataset, grid, index) + 1e-6
            maps[SALIENCE], temperature = sharpen_maps(brightness / brightness.sum(-1, keepdims=True), float(target_entropy))
            params[SALIENCE] = dict(target_entropy_norm=float(target_entropy), temperature=temperature)
    summary = _score(maps, boxes, grid, image_size, thresholds, deltas, batch_size, convention, masks)
    summary.loc[summary["baseline"] == UNIFORM, "pointing"] = np.nan  # no argmax: every token ties
    rows = [{**row, **params[row["baseline"]]} for row in summary.to_dict("records")]
    columns = list(summary.columns) + ["sigma_fraction", "target_entropy_norm", "temperature", "map_seed"]
    return frame(rows, context_columns(context), columns=columns)


def matched_entropy_baselines(
    table: pd.DataFrame,
    boxes,
    grid: Sequence[int],
    image_size: int | Sequence[int] | None = None,
    *,
    by: Sequence[str] = ("backbone", "probe"),
    column: str = "entropy_norm",
    seed: int = 0,
    index: Sequence[int] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    convention: str = "epviz",
    deltas: Sequence[float] = DELTAS,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The entropy-matched random baseline of every probe of a predictor table.

    The target of a group (by default a backbone x probe) is the mean of its predictors'
    `column` (their mean normalised entropy). Every group's random maps share the same noise
    (`seed`) and differ only in their temperature; all groups are scored in one pass.

    Args:
        table: One row per predictor with the `by` columns and `column` (e.g. of
            :func:`epviz.analysis.predictor_tables`).
        boxes: As for :func:`localization_baselines`.
        grid: Patch grid (rows, cols).
        image_size: Image (height, width) or side; default the dataset's ``image_size``.
        by: The columns that make a group (one baseline each).
        column: The normalised-entropy column.
        seed: Seed of the noise.
        index: Images of the dataset to use (default all).
        thresholds: MaxBoxAccV2 thresholds: pass the probes' own.
        convention: MaxBoxAccV2 convention: the probes' own.
        deltas: IoU thresholds.
        batch_size: Images processed together.

    Returns:
        One row per group: the `by` columns, ``baseline`` (``random, matched entropy``), the
        localization columns, entropy, entropy_norm, target_entropy_norm, temperature, map_seed.
    """
    by = list(by)
    missing = [c for c in [*by, column] if c not in table.columns]
    if missing:
        raise ValueError(f"matched_entropy_baselines needs the columns {missing}; the table has {list(table.columns)}")
    targets = table.groupby(by, sort=False, dropna=False)[column].mean()
    if len(targets) == 0:
        raise ValueError("the table is empty: there is no probe to match")
    boxes, image_size, masks = _boxes_and_size(boxes, image_size, index)
    n, num_tokens = len(boxes), _tokens(grid)
    maps, params = {}, []
    for key, target in targets.items():
        key = key if isinstance(key, tuple) else (key,)
        maps[repr(key)], temperature = matched_entropy_maps(n, num_tokens, float(target), seed=seed)
        params.append(
            {**dict(zip(by, key)), "target_entropy_norm": float(target), "temperature": temperature, "map_seed": int(seed)}
        )
    summary = _score(maps, boxes, grid, image_size, thresholds, deltas, batch_size, convention, masks).assign(baseline=MATCHED)
    keys = pd.DataFrame(params)
    return pd.concat([keys[by], summary, keys.drop(columns=by)], axis=1)


def untrained_probe_baselines(
    probe: str,
    tokens: TokenSet,
    dataset,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    image_size: int | Sequence[int] | None = None,
    index: Sequence[int] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    convention: str = "epviz",
    deltas: Sequence[float] = DELTAS,
    context: Mapping | None = None,
    batch_size: int = 64,
    target_entropy: float | None = None,
    **options,
) -> pd.DataFrame:
    """The localization of freshly initialised probes' maps on `tokens`: what a probe shows before training.

    Args:
        probe: A registered attentive probe name (e.g. ``"ep16"``), built as :func:`epviz.probes.build` does.
        tokens: The tokens the trained probe is measured on (same backbone, block and images).
        dataset: Their dataset with GT boxes.
        seeds: Initialisation seeds, one row each.
        image_size: Image (height, width) or side; default the dataset's ``image_size``.
        index: Images to measure (default all), e.g. the trained probe's ``localization_index``.
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01): pass the trained probe's own.
        convention: MaxBoxAccV2 convention, "epviz" or "wsol": the trained probe's own.
        deltas: IoU thresholds (default 0.3, 0.5, 0.7).
        context: Values of the context columns (backbone, layer, probe, seed).
        batch_size: Images per batch.
        target_entropy: The trained probe's mean normalised entropy: adds, per seed, the untrained maps
            sharpened to it (``untrained probe, matched entropy``).
        **options: Build options of the probe (e.g. ``num_queries``).

    Returns:
        One row per seed (and version): ``baseline`` ("untrained probe", "untrained probe, matched
        entropy"), ``init_seed``, the means over the probe's predictors of the lifts (``mask_lift``,
        ``mask_lift_px`` where the dataset has masks, ``box_lift``), ``maxboxacc_v2``, ``inbox_mass``,
        ``pointing`` and ``entropy_norm``, the lowest and highest predictor's MaxBoxAccV2
        (``maxboxacc_v2_min`` / ``_max``), ``chance_mass``, ``predictors`` (and ``target_entropy_norm``,
        ``temperature`` of the matched version).

    Raises:
        ValueError: No seeds, or a probe without attention predictors.
    """
    if not len(seeds):
        raise ValueError("untrained_probe_baselines needs at least one seed, e.g. seeds=(0, 1, 2)")
    num_classes = max(int(tokens.num_classes or 0), 2)  # the maps do not depend on the classes
    index = list(range(len(tokens))) if index is None else [int(i) for i in index]
    boxes, image_size, masks = _boxes_and_size(dataset, image_size, index)
    scoring: dict[str, Any] = dict(
        thresholds=thresholds, deltas=deltas, batch_size=batch_size, convention=convention, masks=masks
    )
    rows = []
    for seed in seeds:
        fresh = build(probe, tokens.dim, num_classes, seed=int(seed), **options)
        if fresh.num_predictors == 0:
            raise ValueError(f"probe {probe!r} has no attention predictors: there are no maps to measure")
        maps = collect_attention(fresh, tokens, batch_size, index).astype(np.float64)  # (n, K, N)
        versions: dict[str, tuple[np.ndarray, dict]] = {UNTRAINED: (maps, {})}
        if target_entropy is not None:
            flat, temperature = sharpen_maps(maps.reshape(-1, maps.shape[-1]), float(target_entropy))
            versions[UNTRAINED_MATCHED] = (
                flat.reshape(maps.shape),
                dict(target_entropy_norm=float(target_entropy), temperature=temperature),
            )
        for name, (version, params) in versions.items():
            table = localization_from_maps(version, boxes, tokens.grid, image_size, **scoring)
            lifts = {c: float(table[c].mean()) for c in ("mask_lift", "mask_lift_px", "box_lift") if c in table}
            rows.append(
                {
                    "baseline": name,
                    "init_seed": int(seed),
                    **lifts,
                    "maxboxacc_v2": float(table["maxboxacc_v2"].mean()),
                    "maxboxacc_v2_min": float(table["maxboxacc_v2"].min()),
                    "maxboxacc_v2_max": float(table["maxboxacc_v2"].max()),
                    "inbox_mass": float(table["inbox_mass"].mean()),
                    "chance_mass": float(table["chance_mass"].mean()),
                    "pointing": float(table["pointing"].mean()),
                    "entropy_norm": float(map_entropy(version).mean() / math.log(version.shape[-1])),
                    "predictors": len(table),
                    **params,
                }
            )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return frame(rows, context_columns(context), columns=columns)
