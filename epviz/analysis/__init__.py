"""Analyses of trained probes; each returns tidy pandas DataFrames.

Every result row carries the context columns ``backbone``, ``layer``, ``probe`` and ``seed``
(:mod:`epviz.tables`), so results of many runs concatenate into one table.

* :class:`Meter` / :func:`register_meter` / :func:`measure`: per-predictor measures as meters,
  many of them fed by one pass over the tokens; the registered ones make the predictor table,
  the figures' axis labels (:func:`column_label`) and the Explorer's table (:func:`table_columns`).
* :func:`uniform_ablation`: accuracy drop when one attention predictor becomes uniform
  (meter ``uniform_ablation``); :func:`uniform_effect`: the same per image.
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
* :func:`spearman` / :func:`row_spearman`: the rank correlation used throughout.
"""

from epviz.analysis.ablation import UniformAblation, ablated_logits, uniform_ablation, uniform_effect
from epviz.analysis.attribution import (
    AttributionComparison, TokenAttribution, attention_agreement, attribution_vs_attention, importance_vs_ablation,
    join_importance, predictor_importance, sliced_probe_names, token_attribution, topk_overlap,
)
from epviz.analysis.efficiency import backbone_flops, count_flops, efficiency, probe_costs, probe_flops, throughput
from epviz.analysis.entropy import Entropy, entropy, entropy_from_maps, map_entropy
from epviz.analysis.localization import (
    DELTAS, THRESHOLDS, Localization, LocalizationMeter, localization, localization_from_maps,
)
from epviz.analysis.measure import measure
from epviz.analysis.meters import (
    Meter, MeterBatch, column_label, meter_class, meter_names, register_meter, table_columns, unregister_meter,
)
from epviz.analysis.query_groups import QueryGroups, group_maps, group_queries, pairwise_overlap, query_groups
from epviz.analysis.report import predictor_table, predictor_tables
from epviz.analysis.stats import Spearman, row_spearman, spearman

__all__ = [
    "DELTAS", "THRESHOLDS", "AttributionComparison", "Entropy", "Localization", "LocalizationMeter", "Meter",
    "MeterBatch", "QueryGroups", "Spearman", "TokenAttribution", "UniformAblation", "ablated_logits",
    "attention_agreement", "attribution_vs_attention", "backbone_flops", "column_label", "count_flops", "efficiency",
    "entropy", "entropy_from_maps", "group_maps", "group_queries", "importance_vs_ablation", "join_importance",
    "localization", "localization_from_maps", "map_entropy", "measure", "meter_class", "meter_names",
    "pairwise_overlap", "predictor_importance", "predictor_table", "predictor_tables", "probe_costs", "probe_flops",
    "query_groups", "register_meter", "row_spearman", "sliced_probe_names", "spearman", "table_columns", "throughput",
    "token_attribution", "topk_overlap", "uniform_ablation", "uniform_effect", "unregister_meter",
]
