"""Curves: training histories, accuracy per block, per number of labelled images, and measures along a sweep."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import ScalarFormatter

from epviz.viz.style import axis_label, backbone_colours, backbone_order, chance_level, draw_chance, require_columns, save_figure

__all__ = ["layer_curves", "low_shot_curves", "sweep_curves", "training_curves"]


def training_curves(histories: pd.DataFrame, out: str | Path | None = None, name: str = "training_curves") -> plt.Figure:
    """Validation accuracy per epoch (columns epoch, val_acc, and a `run` label per curve)."""
    fig, ax = plt.subplots(figsize=(5.5, 3))
    sns.lineplot(data=histories, x="epoch", y="val_acc", hue="run", marker="o", ms=3, ax=ax)
    ax.set_ylabel("validation top-1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, histories, name, out)
    return fig


def _mean_std(runs: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    grouped = runs.groupby(by, sort=True)[y]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"mean": f"{y}_mean", "std": f"{y}_std", "count": "runs"})


def _curves(
    runs: pd.DataFrame,
    xcol: str,
    y: str,
    xlabel: str,
    logx: bool,
    title: str,
    out: str | Path | None,
    name: str,
    chance: float | None = None,
) -> plt.Figure:
    chance = chance_level(runs, chance)
    summary = _mean_std(runs, ["backbone", "probe", xcol], y)
    backbones = backbone_order(summary["backbone"])
    probes = list(dict.fromkeys(runs["probe"]))
    hue = dict(zip(probes, sns.color_palette("tab10", max(10, len(probes))).as_hex()))
    fig, axes = plt.subplots(1, len(backbones), figsize=(3.4 * len(backbones), 3.0), squeeze=False, sharey=True)
    for ax, backbone in zip(axes[0], backbones):
        for probe in probes:
            s = summary[(summary["backbone"] == backbone) & (summary["probe"] == probe)].sort_values(xcol)
            if not len(s):
                continue
            mean, std = s[f"{y}_mean"].to_numpy(), s[f"{y}_std"].fillna(0).to_numpy()
            ax.plot(s[xcol], mean, marker="o", ms=3, color=hue[probe], label=probe)
            ax.fill_between(s[xcol], mean - std, mean + std, color=hue[probe], alpha=0.18, lw=0)
        draw_chance(ax, chance)
        if logx:
            ax.set_xscale("log")
        ax.set_title(backbone, fontsize=8, color=backbone_colours([backbone])[backbone])
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, lw=0.4, alpha=0.5)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(axis_label(y) + (" (mean ± std)" if summary["runs"].max() > 1 else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if chance is not None:
        summary = summary.assign(chance=chance)
    save_figure(fig, summary, name, out)
    return fig


def layer_curves(
    runs: pd.DataFrame,
    y: str = "best_acc",
    out: str | Path | None = None,
    name: str = "layer_curves",
    chance: float | None = None,
) -> plt.Figure:
    """Accuracy per block: one panel per backbone, one line per probe (mean ± std over seeds).

    Args:
        runs: Rows of :func:`epviz.analysis.layer_sweep` (columns backbone, layer, probe, `y`).
        y: The accuracy column.
        out: Folder for ``<name>.png`` / ``.csv`` (the CSV holds the per-point mean, std, runs).
        name: File stem.
        chance: The chance accuracy drawn as a line; default 1 / the runs' ``num_classes``, none without it.
    """
    require_columns(runs, ["backbone", "layer", "probe", y], "layer_curves")
    return _curves(runs, "layer", y, "block (0 = first)", False, "Probes on the tokens of every block", out, name, chance)


def low_shot_curves(
    runs: pd.DataFrame, y: str = "best_acc", out: str | Path | None = None, name: str = "low_shot", chance: float | None = None
) -> plt.Figure:
    """Accuracy against labelled images per class (log axis), mean ± std over seeds.

    Args:
        runs: Rows of :func:`epviz.analysis.low_shot` (columns backbone, probe, shots, `y`).
        y: The accuracy column.
        out: Folder for ``<name>.png`` / ``.csv`` (the CSV holds the per-point mean, std, runs).
        name: File stem.
        chance: The chance accuracy drawn as a line; default 1 / the runs' ``num_classes``, none without it.
    """
    require_columns(runs, ["backbone", "probe", "shots", y], "low_shot_curves")
    return _curves(runs, "shots", y, "labelled images per class (log scale)", True, "Low-shot probing", out, name, chance)


def sweep_curves(
    table: pd.DataFrame,
    x: str,
    measures: Mapping[str, str],
    xlabel: str,
    line: str = "backbone",
    logx: bool = False,
    out: str | Path | None = None,
    name: str = "sweep",
) -> plt.Figure:
    """Measures against one swept quantity (mean ± std over seeds), one panel per measure, references beside.

    Rows with a value of `x` make the curves (one per value of `line`); rows without one (NaN) are references,
    drawn as a dashed line with a ±std band per backbone: e.g. the checkpoints of one pre-training run against
    epochs, with the other backbones beside them, or a probe against its number of queries.

    Args:
        table: One row per run (seed), with `x`, `line`, ``backbone`` and the `measures` columns.
        x: The swept column.
        measures: Column -> axis label, one panel each.
        xlabel: Label of the x axis.
        line: Column naming the curves.
        logx: Log-scale x axis (base 2).
        out: Folder for ``<name>.png`` / ``.csv`` (per curve point and reference: mean, std, runs of each measure).
        name: File stem.
    """
    require_columns(table, [x, line, "backbone", *measures], "sweep_curves")
    swept, references = table[table[x].notna()], table[table[x].isna()]
    if swept[x].nunique() < 2:
        raise ValueError(f"sweep_curves needs two or more values of {x!r}; the table has {sorted(swept[x].unique())}")
    series, others = list(dict.fromkeys(swept[line])), list(dict.fromkeys(references["backbone"]))
    colours = dict(zip(series + others, sns.color_palette("tab10", max(10, len(series) + len(others)))))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures), 2.9), squeeze=False)
    parts = []
    for ax, (column, label) in zip(axes[0], measures.items()):
        points = _mean_std(swept, [line, x], column).assign(measure=column)
        fixed = _mean_std(references, ["backbone"], column).assign(measure=column)
        for value in series:
            s = points[points[line] == value].sort_values(x)
            mean, std = s[f"{column}_mean"].to_numpy(), s[f"{column}_std"].fillna(0).to_numpy()
            ax.errorbar(s[x], mean, yerr=std, marker="o", ms=3, capsize=2, color=colours[value], label=value)
        for row in fixed.itertuples(index=False):
            mean, std = getattr(row, f"{column}_mean"), getattr(row, f"{column}_std")
            ax.axhline(mean, color=colours[row.backbone], ls="--", lw=1, label=row.backbone)
            ax.axhspan(mean - (std or 0), mean + (std or 0), color=colours[row.backbone], alpha=0.12, lw=0)
        if logx:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(sorted(swept[x].unique()))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(label + " (mean ± std)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, lw=0.4, alpha=0.5)
        short = {f"{column}_{k}": k for k in ("mean", "std")}
        parts += [points.rename(columns=short), fixed.rename(columns=short)]
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    save_figure(fig, pd.concat(parts, ignore_index=True), name, out)
    return fig
