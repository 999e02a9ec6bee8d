"""The per-predictor table: one row per attention predictor with every registered per-predictor measure.

The registered meters (:mod:`epviz.analysis.meters`: the accuracy drop when made uniform, the
localization, the entropy, and any meter registered later) run in one pass over the tokens
(:func:`~epviz.analysis.measure`); their summaries are joined on ``predictor``. The controls of
the uniform ablation (:mod:`epviz.analysis.controls`) are meters too; the mean-map control reads
the training tokens (``train_tokens=``). Meters that keep per-image records get bootstrap
intervals over the test images (:mod:`epviz.analysis.intervals`): ``<column>_lo`` and
``<column>_hi`` columns at the end of the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from epviz.analysis.intervals import LEVEL, N_BOOT, Bootstrap
from epviz.analysis.measure import build_meters, measure
from epviz.probes import Probe
from epviz.tokens import TokenSet

__all__ = ["predictor_table", "predictor_tables"]


def predictor_table(
    probe: Probe,
    tokens: TokenSet,
    dataset,
    *,
    context: Mapping | None = None,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    train_tokens: TokenSet | None = None,
    mean_maps: torch.Tensor | np.ndarray | None = None,
    shuffle_seed: int = 0,
    n_boot: int = N_BOOT,
    boot_seed: int = 0,
    level: float = LEVEL,
) -> pd.DataFrame:
    """One row per attention predictor: every registered meter's measures, from one pass over the tokens.

    Args:
        probe: A trained attentive probe.
        tokens: Evaluation tokens of `dataset`'s images, in order.
        dataset: The images with their GT boxes.
        context: Values of the context columns (backbone, layer, probe, seed, ...).
        index: Optional subset of images.
        localization_index: Images of the localization measure, if other than `index`
            (MaxBoxAccV2 is the costly measure).
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01).
        train_tokens: Training tokens of the same backbone and layer, for the mean-map control
            (without them and without `mean_maps`, ``delta_acc_mean`` is NaN).
        mean_maps: Precomputed mean training maps (K, R, N) instead of `train_tokens`.
        shuffle_seed: Seed of the shuffled control's derangement of the images.
        n_boot: Bootstrap resamples of the intervals; 0 adds no interval columns.
        boot_seed: Seed of the resamples.
        level: Interval level.

    Returns:
        The context columns and ``predictor``, then the columns of
        :func:`~epviz.analysis.uniform_ablation` (acc_full, acc_uniform, delta_acc, n_images), of
        :func:`~epviz.analysis.localization` (maxboxacc_v2, ..., inbox_mass, chance_mass, pointing,
        n_images_localization), of :func:`~epviz.analysis.entropy` (entropy, entropy_norm, ...),
        of the controls (acc_mean, delta_acc_mean, acc_shuffled, delta_acc_shuffled, acc_zero,
        delta_acc_zero), of every other registered meter, ``predictors`` (K), and the intervals
        (acc_full_lo, acc_full_hi, delta_acc_lo, delta_acc_hi, delta_acc_mean_lo, ..., maxboxacc_v2_lo,
        ..., inbox_mass_lo, ..., pointing_lo, pointing_hi) when `n_boot` > 0.
    """
    options = dict(thresholds=thresholds, mean_maps=mean_maps, train_tokens=train_tokens, seed=shuffle_seed)
    measured = dict(context=context, index=index, localization_index=localization_index)
    return _measured(probe, tokens, dataset, options, measured, n_boot=n_boot, boot_seed=boot_seed, level=level)[0]


def _measured(
    probe: Probe, tokens: TokenSet, dataset, options: dict, measured: dict, *, n_boot: int, boot_seed: int, level: float
) -> tuple[pd.DataFrame, Bootstrap | None]:
    """The predictor table of one probe (meters built with `options`, measured with `measured`) and its Bootstrap."""
    meters = build_meters(None, {**options, "records": bool(n_boot)})
    table = measure(probe, tokens, dataset, meters, **measured)
    table["predictors"] = probe.num_predictors
    if len(table) != probe.num_predictors:
        raise RuntimeError(f"expected {probe.num_predictors} predictor rows, got {len(table)}")
    if "delta_acc" in table and (table["delta_acc"].isna().any() or not np.isfinite(table["delta_acc"]).all()):
        raise RuntimeError("a predictor has no accuracy drop")
    if not n_boot:
        return table, None
    context_keys = list(table.columns[: list(table.columns).index("predictor")])
    records = Bootstrap(meters, n_boot=n_boot, seed=boot_seed, level=level, context={c: table[c].iloc[0] for c in context_keys})
    return table.merge(records.intervals(), on="predictor", how="left"), records


def predictor_tables(
    fitted: Mapping[tuple[str, str], Probe],
    tokens: Mapping[str, Mapping[str, TokenSet]],
    dataset,
    *,
    split: str = "test",
    seed: int = 0,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    train_split: str | None = "train",
    shuffle_seed: int = 0,
    n_boot: int = N_BOOT,
    boot_seed: int = 0,
    level: float = LEVEL,
) -> tuple[pd.DataFrame, dict[tuple[str, str], Bootstrap | None]]:
    """:func:`predictor_table` of every attentive probe in `fitted`, as one table, with each probe's bootstrap.

    Args:
        fitted: Trained probes keyed by (backbone, label), as returned by :func:`probe_zoo`;
            probes without attention predictors are skipped.
        tokens: ``{backbone: {split: TokenSet}}``.
        dataset: The images of the `split` tokens, with GT boxes.
        split: Which split's tokens to measure on.
        seed: Value of the ``seed`` column.
        index: Optional subset of images.
        localization_index: Images of the localization measure, if other than `index`.
        thresholds: MaxBoxAccV2 thresholds.
        train_split: The split whose tokens give the mean-map control its training maps (None:
            no mean-map control, or when a backbone has no such split).
        shuffle_seed, n_boot, boot_seed, level: See :func:`predictor_table`.

    Returns:
        The table, and ``{(backbone, label): Bootstrap}`` of the passes (None where `n_boot` is 0), for
        :meth:`~epviz.analysis.intervals.Bootstrap.spearman` intervals and the means' intervals.
    """
    if train_split is not None and train_split == split:
        raise ValueError(f"train_split and split are both '{split}': the mean map must come from other images")
    parts, records = [], {}
    for (backbone, label), probe in fitted.items():
        if probe.num_predictors == 0:
            continue
        ts = tokens[backbone][split]
        train = None if train_split is None else tokens[backbone].get(train_split)
        context = dict(backbone=backbone, layer=ts.origin.layer, probe=label, seed=seed)
        options = dict(thresholds=thresholds, train_tokens=train, seed=shuffle_seed)
        measured = dict(context=context, index=index, localization_index=localization_index)
        table, records[backbone, label] = _measured(
            probe, ts, dataset, options, measured, n_boot=n_boot, boot_seed=boot_seed, level=level
        )
        parts.append(table)
    if not parts:
        raise ValueError("none of the probes has attention predictors: use attentive probes (e.g. ep, mhca)")
    return pd.concat(parts, ignore_index=True), records
