"""Figures. Each function returns a matplotlib Figure and, given `out`, saves the PNG and the CSV
of the data behind it (atomically) as ``<out>/<name>.png`` / ``.csv``.

* :mod:`~epviz.viz.style`: colours, axis labels, :func:`save_figure`.
* :mod:`~epviz.viz.maps`: attention maps over images, overlays, query-group galleries.
* :mod:`~epviz.viz.costs`: accuracy against parameters and FLOPs (Figs. 2, 3).
* :mod:`~epviz.viz.predictors`: Δacc against map properties (Fig. 4).
* :mod:`~epviz.viz.curves`: training, layer and low-shot curves.
* :mod:`~epviz.viz.attribution`: captum attribution beside attention.
"""

from epviz.viz import attribution
from epviz.viz.costs import accuracy_vs_cost, accuracy_vs_flops, accuracy_vs_params, zoo_overview
from epviz.viz.curves import layer_curves, low_shot_curves, sweep_curves, training_curves
from epviz.viz.maps import (
    GROUP_COLOURS,
    attention_overlays,
    canvas_gallery,
    draw_boxes,
    query_group_gallery,
    upsample_maps,
)
from epviz.viz.predictors import delta_acc_panels
from epviz.viz.style import BACKBONE_PALETTE, METRIC_LABELS, axis_label, backbone_colours, register_label, save_figure

__all__ = [
    "BACKBONE_PALETTE",
    "GROUP_COLOURS",
    "METRIC_LABELS",
    "accuracy_vs_cost",
    "accuracy_vs_flops",
    "accuracy_vs_params",
    "attention_overlays",
    "attribution",
    "axis_label",
    "backbone_colours",
    "canvas_gallery",
    "delta_acc_panels",
    "draw_boxes",
    "layer_curves",
    "sweep_curves",
    "low_shot_curves",
    "query_group_gallery",
    "register_label",
    "save_figure",
    "training_curves",
    "upsample_maps",
    "zoo_overview",
]
