"""The per-predictor table: one row per attention predictor with every per-predictor measure.

For each attention predictor of a probe: its accuracy drop when made uniform
(:func:`~epviz.analysis.uniform_ablation`), its localization (:func:`~epviz.analysis.localization`)
and its entropy (:func:`~epviz.analysis.entropy`), merged on the context columns and ``predictor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from epviz.analysis.ablation import uniform_ablation
from epviz.analysis.entropy import entropy
from epviz.analysis.localization import localization
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
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """One row per attention predictor: its accuracy drop when made uniform, its localization and entropy.

    Args:
        probe: A trained attentive probe.
        tokens: Evaluation tokens of `dataset`'s images, in order.
        dataset: The images with their GT boxes.
        context: Values of the context columns (backbone, layer, probe, seed, ...).
        index: Optional subset of images.
        localization_index: Images of the localization measure, if other than `index`
            (MaxBoxAccV2 is the costly measure).
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01).

    Returns:
        The columns of :func:`~epviz.analysis.uniform_ablation` (delta_acc, ...), of
        :func:`~epviz.analysis.localization` (maxboxacc_v2, inbox_mass, chance_mass, pointing, ...)
        and of :func:`~epviz.analysis.entropy` (entropy, entropy_norm, ...), merged on the
        context columns and ``predictor``.
    """
    index = None if index is None else np.asarray(list(index), dtype=np.int64)
    loc_index = index if localization_index is None else np.asarray(list(localization_index), dtype=np.int64)
    ablation = uniform_ablation(probe, tokens, context=context, index=index)
    keys = [c for c in ablation.columns if c not in ("acc_full", "acc_uniform", "delta_acc", "n_images")]
    loc = localization(probe, tokens, dataset, context=context, index=loc_index, thresholds=thresholds)
    loc = loc.rename(columns={"n_images": "n_images_localization"})
    ent = entropy(probe, tokens, context=context, index=index)
    table = ablation.merge(loc, on=keys).merge(ent.drop(columns=["n_images"]), on=keys)
    table["predictors"] = probe.num_predictors
    if len(table) != probe.num_predictors:
        raise RuntimeError(f"expected {probe.num_predictors} predictor rows, got {len(table)}")
    if table["delta_acc"].isna().any() or not np.isfinite(table["delta_acc"]).all():
        raise RuntimeError("a predictor has no accuracy drop")
    return table


def predictor_tables(
    fitted: Mapping[tuple[str, str], Probe],
    tokens: Mapping[str, Mapping[str, TokenSet]],
    dataset,
    *,
    split: str = "test",
    seed: int = 0,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """:func:`predictor_table` of every attentive probe in `fitted`, as one table.

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
    """
    parts = []
    for (backbone, label), probe in fitted.items():
        if probe.num_predictors == 0:
            continue
        ts = tokens[backbone][split]
        context = dict(backbone=backbone, layer=ts.origin.layer, probe=label, seed=seed)
        parts.append(predictor_table(probe, ts, dataset, context=context, index=index,
                                     localization_index=localization_index, thresholds=thresholds))
    if not parts:
        raise ValueError("none of the probes has attention predictors: use attentive probes (e.g. ep, mhca)")
    return pd.concat(parts, ignore_index=True)
