"""Analyses of trained probes; each returns tidy pandas DataFrames.

Every result row carries the context columns ``backbone``, ``layer``, ``probe`` and ``seed``
(:mod:`epviz.tables`), so results of many runs concatenate into one table.

* :class:`Meter` / :func:`register_meter` / :func:`measure`: per-predictor measures as meters,
  many of them fed by one pass over the tokens; the registered ones make the predictor table,
  the figures' axis labels (:func:`column_label`) and the Explorer's table (:func:`table_columns`).
* :func:`uniform_ablation`: accuracy drop when one attention predictor becomes uniform
  (meter ``uniform_ablation``); :func:`uniform_effect`: the same per image.
* Controls of the uniform ablation (:mod:`epviz.analysis.controls`): the predictor's mean
  training map, another image's map, a zeroed pooled slice (meters ``mean_map_ablation``,
  ``shuffled_ablation``, ``zero_ablation``; columns ``delta_acc_mean``, ``delta_acc_shuffled``,
  ``delta_acc_zero``).
* Bootstrap intervals over test images (:mod:`epviz.analysis.intervals`): :class:`Bootstrap`
  (``<column>_lo`` / ``_hi``, Spearman ρ intervals), :func:`spearman_intervals`, :func:`bootstrap_mean`,
  :func:`group_means` (per-image columns averaged per group), :func:`paired_difference` (two arms on
  the same test images, resampling seeds and images).
* :func:`localization` / :func:`localization_from_maps`: MaxBoxAccV2, attention mass in the
  GT boxes, pointing game (meter ``localization``).
* :func:`entropy` / :func:`entropy_from_maps`: entropy of the maps, in nats and over log N
  (meter ``entropy``).
* :func:`predictor_table` / :func:`predictor_tables`: every registered meter in one table.
* :func:`efficiency` / :func:`probe_costs`: trainable parameters, FLOPs, throughput.
* :func:`query_groups`: overlap between predictors, their groups and group maps.
* :func:`predictor_importance`, :func:`importance_vs_ablation`: captum LayerFeatureAblation of each
  predictor's pooled slice, ranked against Δacc; :func:`token_attribution`,
  :func:`attention_agreement`, :func:`attribution_vs_attention`: captum Integrated Gradients on the
  patch tokens, compared with the attention maps.
* :func:`localization_baselines` / :func:`matched_entropy_baselines`: the localization scores of
  trivial maps (uniform, a centred prior, random maps of matched entropy), the chance lines;
  :func:`untrained_probe_baselines`: those of freshly initialised probes on the same tokens.
* :func:`spearman` / :func:`row_spearman`: the rank correlation used throughout.
"""

from epviz.analysis.ablation import AblationMeter, UniformAblation, ablated_logits, uniform_ablation, uniform_effect
from epviz.analysis.attribution import (
    AttributionComparison,
    ImportanceRank,
    TokenAttribution,
    attention_agreement,
    attribution_vs_attention,
    importance_rank,
    importance_vs_ablation,
    join_importance,
    predictor_importance,
    sliced_probe_names,
    token_attribution,
    topk_overlap,
)
from epviz.analysis.baselines import (
    centre_prior_maps,
    localization_baselines,
    matched_entropy_baselines,
    matched_entropy_maps,
    uniform_maps,
    untrained_probe_baselines,
)
from epviz.analysis.controls import (
    CONTROL_COLUMNS,
    MeanMapAblation,
    ShuffledAblation,
    ZeroAblation,
    derangement,
    mean_attention_rows,
)
from epviz.analysis.efficiency import backbone_flops, count_flops, efficiency, probe_costs, probe_flops, throughput
from epviz.analysis.entropy import Entropy, entropy, entropy_from_maps, map_entropy
from epviz.analysis.intervals import (
    Bootstrap,
    PairedDifference,
    RhoInterval,
    bootstrap_mean,
    group_means,
    paired_difference,
    spearman_intervals,
)
from epviz.analysis.localization import (
    DELTAS,
    THRESHOLDS,
    Localization,
    LocalizationMeter,
    localization,
    localization_from_maps,
)
from epviz.analysis.measure import measure
from epviz.analysis.meters import (
    Meter,
    MeterBatch,
    column_label,
    meter_class,
    meter_names,
    register_meter,
    table_columns,
    unregister_meter,
)
from epviz.analysis.query_groups import QueryGroups, group_contrast, group_maps, group_queries, pairwise_overlap, query_groups
from epviz.analysis.report import predictor_table, predictor_tables
from epviz.analysis.stats import Spearman, row_spearman, spearman

__all__ = [
    "CONTROL_COLUMNS",
    "AblationMeter",
    "Bootstrap",
    "MeanMapAblation",
    "RhoInterval",
    "ShuffledAblation",
    "ZeroAblation",
    "bootstrap_mean",
    "paired_difference",
    "PairedDifference",
    "group_means",
    "derangement",
    "mean_attention_rows",
    "spearman_intervals",
    "DELTAS",
    "THRESHOLDS",
    "AttributionComparison",
    "ImportanceRank",
    "Entropy",
    "Localization",
    "LocalizationMeter",
    "Meter",
    "MeterBatch",
    "QueryGroups",
    "Spearman",
    "TokenAttribution",
    "UniformAblation",
    "ablated_logits",
    "attention_agreement",
    "attribution_vs_attention",
    "backbone_flops",
    "centre_prior_maps",
    "column_label",
    "count_flops",
    "efficiency",
    "entropy",
    "entropy_from_maps",
    "group_contrast",
    "group_maps",
    "group_queries",
    "importance_rank",
    "importance_vs_ablation",
    "join_importance",
    "localization",
    "localization_baselines",
    "localization_from_maps",
    "map_entropy",
    "matched_entropy_baselines",
    "matched_entropy_maps",
    "measure",
    "meter_class",
    "meter_names",
    "pairwise_overlap",
    "predictor_importance",
    "predictor_table",
    "predictor_tables",
    "probe_costs",
    "probe_flops",
    "query_groups",
    "register_meter",
    "row_spearman",
    "sliced_probe_names",
    "spearman",
    "table_columns",
    "throughput",
    "token_attribution",
    "topk_overlap",
    "uniform_ablation",
    "uniform_effect",
    "uniform_maps",
    "unregister_meter",
    "untrained_probe_baselines",
]
