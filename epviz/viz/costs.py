"""Accuracy against cost (paper Figs. 2 and 3), and the zoo's accuracy bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from epviz.viz.style import BACKBONE_PALETTE, axis_label, backbone_colours, backbone_order, require_columns, save_figure

__all__ = ["accuracy_vs_cost", "accuracy_vs_flops", "accuracy_vs_params", "zoo_overview"]


def zoo_overview(results: pd.DataFrame, out: str | Path | None = None, name: str = "zoo_probe_accuracy") -> plt.Figure:
    """Bar chart of probe test accuracy per zoo backbone (columns backbone, probe, test_acc)."""
    order = [b for b in BACKBONE_PALETTE if b in set(results["backbone"])]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    sns.barplot(data=results, x="probe", y="test_acc", hue="backbone", hue_order=order, palette=BACKBONE_PALETTE, ax=ax)
    chance = 1.0 / results.get("num_classes", pd.Series([10])).iloc[0]
    ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy (test canvases)")
    ax.set_xlabel("probe (last block, cached tokens)")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    for container in ax.containers:
        if hasattr(container, "datavalues"):
            ax.bar_label(container, fmt="%.2f", fontsize=6, padding=1)
    fig.tight_layout()
    save_figure(fig, results, name, out)
    return fig


def accuracy_vs_cost(results: pd.DataFrame, x: str = "params", y: str = "test_acc", label: str = "probe",
                     title: str = "", out: str | Path | None = None, name: str = "accuracy_vs_params") -> plt.Figure:
    """Accuracy against a cost on a log axis: one labelled point per row, one colour per backbone.

    Args:
        results: One row per backbone x probe with columns ``backbone``, `label`, `x` and `y`.
        x: The cost column (e.g. ``params``, ``gflops``); values must be positive.
        y: The accuracy column.
        label: The column whose value is written next to each point.
        title: Figure title.
        out: Folder for ``<name>.png`` / ``.csv``; None saves nothing.
        name: File stem.
    """
    require_columns(results, ["backbone", label, x, y], "accuracy_vs_cost")
    cost = pd.to_numeric(results[x], errors="coerce")
    if not (cost > 0).all():
        bad = results.loc[~(cost > 0), label].tolist()
        raise ValueError(f"{x} must be positive for a log axis; rows {bad} are not")
    order = backbone_order(results["backbone"])
    colours = backbone_colours(order)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for backbone in order:
        rows = results[results["backbone"] == backbone]
        ax.scatter(rows[x], rows[y], s=30, color=colours[backbone], label=backbone, edgecolor="white", linewidth=0.5, zorder=3)
        for _, row in rows.iterrows():
            ax.annotate(str(row[label]), (row[x], row[y]), xytext=(3, 2), textcoords="offset points", fontsize=6,
                        color=colours[backbone])
    ax.set_xscale("log")
    ax.set_xlabel(axis_label(x) + " (log scale)")
    ax.set_ylabel(axis_label(y))
    ax.grid(True, which="major", lw=0.4, alpha=0.5)
    ax.legend(fontsize=7, title="backbone", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, results.reset_index(drop=True), name, out)
    return fig


def accuracy_vs_params(results: pd.DataFrame, y: str = "test_acc", out: str | Path | None = None,
                       name: str = "accuracy_vs_params") -> plt.Figure:
    """Paper Fig. 2: accuracy against trainable parameters, one point per probe and backbone."""
    return accuracy_vs_cost(results, x="params", y=y, title="Accuracy vs trainable parameters", out=out, name=name)


def accuracy_vs_flops(results: pd.DataFrame, x: str = "gflops", y: str = "test_acc", out: str | Path | None = None,
                      name: str = "accuracy_vs_gflops") -> plt.Figure:
    """Paper Fig. 3: accuracy against GFLOPs per image (the probe's by default), one point per probe and backbone."""
    return accuracy_vs_cost(results, x=x, y=y, title="Accuracy vs GFLOPs", out=out, name=name)
