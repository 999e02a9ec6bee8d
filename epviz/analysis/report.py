"""The per-predictor table: one row per attention predictor with every registered per-predictor measure.

The registered meters (:mod:`epviz.analysis.meters`: the accuracy drop when made uniform, the
localization, the entropy, and any meter registered later) run in one pass over the tokens
(:func:`~epviz.analysis.measure`); their summaries are joined on ``predictor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from epviz.analysis.localization import Localization
from epviz.analysis.measure import measure
from epviz.analysis.meters import Meter, meter_class, meter_names
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

    Returns:
        The context columns and ``predictor``, then the columns of
        :func:`~epviz.analysis.uniform_ablation` (acc_full, acc_uniform, delta_acc, n_images), of
        :func:`~epviz.analysis.localization` (maxboxacc_v2, ..., inbox_mass, chance_mass, pointing,
        n_images_localization), of :func:`~epviz.analysis.entropy` (entropy, entropy_norm, ...),
        of every other registered meter, and ``predictors`` (K).
    """
    meters: list[Meter] = [
        Localization(thresholds=thresholds) if meter_class(name) is Localization else meter_class(name)()
        for name in meter_names()
    ]
    table = measure(probe, tokens, dataset, meters, index=index, localization_index=localization_index,
                    context=context)
    table["predictors"] = probe.num_predictors
    if len(table) != probe.num_predictors:
        raise RuntimeError(f"expected {probe.num_predictors} predictor rows, got {len(table)}")
    if "delta_acc" in table and (table["delta_acc"].isna().any() or not np.isfinite(table["delta_acc"]).all()):
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
