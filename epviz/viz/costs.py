"""Accuracy against cost (paper Figs. 2 and 3), and the zoo's accuracy bars.

How Figs. 2 and 3 are drawn (ours): one panel per backbone, x the cost on a log axis, y the
accuracy. The **frontier** of a backbone is the set of its probes that no other probe beats on
both counts: a probe is on it when no other probe has a cost <= and an accuracy >= with one of
the two strictly better (two identical points are both on it); it is drawn as a step line
(the best accuracy reachable within each budget). EP (labels ``ep``, ``ep16``, ``ep_all16``,
``ep16_d2``...) is drawn as a red star, probes without attention (``cls``, ``gap``, or a
``predictors`` column of 0) as open squares, every other probe as a dot in its backbone's
colour. Only the frontier, EP and ``always_label`` probes are labelled, each label placed at
the first of a ring of candidate offsets that overlaps no other label or point; the CSV lists
every probe with its ``frontier``, ``ep`` and ``labelled`` flags. Error bars: ± ``<y>_std``
where it is given (e.g. over seeds), else ``<y>_lo`` / ``<y>_hi`` (an interval, e.g. the bootstrap
interval over test images of a single run). The chance line is 1 / classes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, cast

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.container import BarContainer
from matplotlib.lines import Line2D

from epviz.viz.style import (
    BACKBONE_PALETTE,
    axis_label,
    backbone_colours,
    backbone_order,
    chance_level,
    draw_chance,
    require_columns,
    save_figure,
)

__all__ = [
    "EP_STYLE",
    "accuracy_vs_cost",
    "accuracy_vs_flops",
    "accuracy_vs_params",
    "error_columns",
    "is_ep",
    "pareto_frontier",
    "zoo_overview",
]

EP_STYLE: dict[str, Any] = dict(marker="*", color="#d62728", s=150, edgecolor="k", linewidth=0.5)
_NO_ATTENTION_STYLE: dict[str, Any] = dict(marker="s", facecolor="white", s=30, edgecolor="k", linewidth=0.9)
_EP_NAME = re.compile(r"^ep(\d|_|$)")


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
        if hasattr(container, "datavalues"):  # the bars' containers (a BarContainer)
            ax.bar_label(cast(BarContainer, container), fmt="%.2f", fontsize=6, padding=1)
    fig.tight_layout()
    save_figure(fig, results, name, out)
    return fig


def is_ep(names) -> np.ndarray:
    """Whether each probe name or label is Efficient Probing (``ep``, ``ep16``, ``ep_all16``, ``ep16_d2``...)."""
    return np.array([bool(_EP_NAME.match(str(n).lower())) for n in names], dtype=bool)


def pareto_frontier(cost, acc) -> np.ndarray:
    """Whether each point is on the accuracy-cost frontier: no other point is as cheap and as accurate, one strictly."""
    cost, acc = np.asarray(cost, dtype=float), np.asarray(acc, dtype=float)
    cheaper_or_equal = cost[None, :] <= cost[:, None]  # [i, j]: j costs no more than i
    better_or_equal = acc[None, :] >= acc[:, None]
    strictly = (cost[None, :] < cost[:, None]) | (acc[None, :] > acc[:, None])
    dominated = (cheaper_or_equal & better_or_equal & strictly).any(1)
    return ~dominated & np.isfinite(cost) & np.isfinite(acc)


def error_columns(results: pd.DataFrame, y: str) -> tuple[str, str | None] | None:
    """The error columns of `y`: ``("std", column)`` or ``("interval", lo)`` (with ``hi`` beside it), or None."""
    base = y[: -len("_mean")] if y.endswith("_mean") else y
    for stem in dict.fromkeys((y, base)):
        if f"{stem}_std" in results.columns:
            return "std", f"{stem}_std"
    for stem in dict.fromkeys((y, base)):
        if f"{stem}_lo" in results.columns and f"{stem}_hi" in results.columns:
            return "interval", stem
    return None


def _yerr(rows: pd.DataFrame, y: str, errors) -> np.ndarray | None:
    if errors is None:
        return None
    kind, column = errors
    stem = column[: -len("_std")] if kind == "std" else column
    if {f"{stem}_lo", f"{stem}_hi"} <= set(rows.columns):
        interval = np.vstack(
            [
                rows[y].to_numpy(dtype=float) - rows[f"{stem}_lo"].to_numpy(dtype=float),
                rows[f"{stem}_hi"].to_numpy(dtype=float) - rows[y].to_numpy(dtype=float),
            ]
        )
    else:
        interval = np.full((2, len(rows)), np.nan)
    if kind == "interval":
        return interval
    e = rows[column].to_numpy(dtype=float)
    return np.where(np.isfinite(e), np.vstack([e, e]), interval)  # a single run: its interval


def _error_label(results: pd.DataFrame, errors: tuple[str, str | None]) -> str:
    """The legend entry of the error bars: std over seeds, the interval of single runs, or both."""
    kind, column = errors
    if kind == "interval":
        return "95% interval"
    stem = str(column)[: -len("_std")]
    single = results[column].isna() & results.get(f"{stem}_lo", pd.Series(np.nan, index=results.index)).notna()
    return "± std over seeds; 95% bootstrap interval for single runs" if single.any() else "± std over seeds"


def _ylabel_suffix(results: pd.DataFrame, errors: tuple[str, str | None] | None) -> str:
    """Says "mean ± std" when every bar is a std over seeds; nothing when some are intervals (the legend says which)."""
    if errors is None or errors[0] != "std":
        return ""
    return "" if _error_label(results, errors) != "± std over seeds" else " (mean ± std)"


def _overlap(a, b) -> float:
    """Overlap area of two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _place_labels(ax, xy: np.ndarray, texts: list[str], bold: list[bool], obstacles: np.ndarray, fontsize: float) -> list[dict]:
    """Offsets (points) for labels so that they overlap no other label, point or the axes' edge (greedy)."""
    fig = ax.figure
    px = fig.dpi / 72.0
    inside = ax.get_window_extent()
    frame = (inside.x0, inside.y0, inside.x1, inside.y1)
    anchors = ax.transData.transform(xy)
    points = [(x - 4 * px, y - 4 * px, x + 4 * px, y + 4 * px) for x, y in ax.transData.transform(obstacles)]
    placed: list[tuple[float, float, float, float]] = []
    out: list[dict] = []
    for (ax_, ay), text, heavy in zip(anchors, texts, bold):
        w = (0.62 if heavy else 0.56) * fontsize * len(text) * px + 2 * px
        h = 1.25 * fontsize * px
        best: tuple[float, float, tuple[float, float, float, float], float] | None = None
        best_cost = math.inf
        for ring in (1.0, 2.0, 3.2, 4.6):
            gap = 5 * ring * px
            for dx, dy in (
                (gap, 0.2 * gap),
                (gap, -h - 0.2 * gap),
                (-gap - w, 0.2 * gap),
                (-gap - w, -h - 0.2 * gap),
                (-w / 2, gap),
                (-w / 2, -h - gap),
                (gap, -h / 2),
                (-gap - w, -h / 2),
            ):
                box = (ax_ + dx, ay + dy, ax_ + dx + w, ay + dy + h)
                clash = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, b) for b in points)
                outside = (box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, frame)
                cost = clash + 4 * outside + 0.01 * (ring - 1) * w * h
                if cost < best_cost:
                    best, best_cost = (dx, dy, box, ring), cost
            if best_cost <= 0.01 * (ring - 1) * w * h + 1e-9:
                break
        assert best is not None  # every cost is finite, so the first candidate already beats inf
        dx, dy, box, ring = best
        placed.append(box)
        out.append(dict(offset=(dx / px, dy / px), leader=ring > 1.0))
    return out


def accuracy_vs_cost(
    results: pd.DataFrame,
    x: str = "params",
    y: str = "test_acc",
    label: str = "probe",
    title: str = "",
    out: str | Path | None = None,
    name: str = "accuracy_vs_params",
    *,
    chance: float | None = None,
    always_label=("cls", "gap", "mhca"),
    ncols: int = 3,
) -> plt.Figure:
    """Accuracy against a cost on a log axis, one panel per backbone, with its frontier (Figs. 2, 3).

    See the module docstring for what is drawn: the frontier, EP's star, the labels, error bars and chance.

    Args:
        results: One row per backbone x probe with columns ``backbone``, `label`, `x` and `y`; optional
            ``name`` (the registry name, used to recognise EP), ``predictors`` (0: no attention),
            ``<y>_std`` or ``<y>_lo`` / ``<y>_hi`` (error bars), ``num_classes`` (the chance line).
        x: The cost column (e.g. ``params``, ``gflops``); values must be positive.
        y: The accuracy column (e.g. ``test_acc``, a mean over seeds).
        label: The column whose value labels a point.
        title: Figure title.
        out: Folder for ``<name>.png`` / ``.csv``; None saves nothing.
        name: File stem.
        chance: The chance accuracy; default 1 / ``num_classes`` when the table has it, else no line.
        always_label: Probes labelled wherever they are (besides EP and the frontier).
        ncols: Panels per row.
    """
    require_columns(results, ["backbone", label, x, y], "accuracy_vs_cost")
    cost = pd.to_numeric(results[x], errors="coerce")
    if not (cost > 0).all():
        bad = results.loc[~(cost > 0), label].tolist()
        raise ValueError(f"{x} must be positive for a log axis; rows {bad} are not")
    chance = chance_level(results, chance)
    errors = error_columns(results, y)
    order = backbone_order(results["backbone"])
    colours = backbone_colours(order)

    data = results.reset_index(drop=True).copy()
    data["ep"] = is_ep(data["name"] if "name" in data.columns else data[label]) | is_ep(data[label])
    no_attention = data[label].astype(str).isin(["cls", "gap"])
    if "predictors" in data.columns:
        no_attention |= pd.to_numeric(data["predictors"], errors="coerce").eq(0)
    data["no_attention"] = no_attention & ~data["ep"]
    data["frontier"] = False
    for backbone in order:
        mine = data["backbone"] == backbone
        data.loc[mine, "frontier"] = pareto_frontier(data.loc[mine, x], data.loc[mine, y])
    data["labelled"] = data["frontier"] | data["ep"] | data[label].astype(str).isin([str(a) for a in always_label])

    ncols = max(1, min(int(ncols), len(order)))
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.9 * nrows + 0.5), squeeze=False, sharex=True, sharey=True)
    lo_x, hi_x = float(cost.min()), float(cost.max())
    span = max(math.log10(hi_x / lo_x), 0.5)
    x_lim = (lo_x / 10 ** (0.08 * span), hi_x * 10 ** (0.22 * span))
    acc = pd.to_numeric(data[y], errors="coerce")
    err = _yerr(data, y, errors)
    top = float(np.nanmax(acc + (np.nan_to_num(err[1]) if err is not None else 0)))
    bottom = float(np.nanmin(acc - (np.nan_to_num(err[0]) if err is not None else 0)))
    if chance is not None:
        bottom = min(bottom, chance)
    pad = 0.06 * max(top - bottom, 0.05)
    y_lim = (max(bottom - pad, 0.0), min(top + 2 * pad, 1.0 + pad))

    for k, backbone in enumerate(order):
        ax = axes[k // ncols, k % ncols]
        rows = data[data["backbone"] == backbone]
        colour = colours[backbone]
        front = rows[rows["frontier"]].sort_values([x, y])
        if len(front):
            fx = np.append(front[x].to_numpy(dtype=float), x_lim[1])
            fy = np.append(front[y].to_numpy(dtype=float), front[y].iloc[-1])
            ax.step(fx, fy, where="post", color=colour, lw=1.1, alpha=0.75, zorder=2)
        if errors is not None:
            e = _yerr(rows, y, errors)
            assert e is not None  # errors is not None
            ok = np.isfinite(e).all(0)
            if ok.any():
                ax.errorbar(
                    rows[x][ok], rows[y][ok], yerr=e[:, ok], fmt="none", ecolor="0.25", elinewidth=0.8, capsize=2, zorder=3
                )
        other = rows[~rows["ep"] & ~rows["no_attention"]]
        ax.scatter(other[x], other[y], s=30, color=colour, edgecolor="white", linewidth=0.5, zorder=4)
        plain = rows[rows["no_attention"]]
        ax.scatter(plain[x], plain[y], zorder=4, **_NO_ATTENTION_STYLE)
        ep = rows[rows["ep"]]
        ax.scatter(ep[x], ep[y], zorder=5, **EP_STYLE)
        draw_chance(ax, chance)
        ax.set_xscale("log")
        ax.set_xlim(*x_lim)
        ax.set_ylim(*y_lim)
        ax.grid(True, which="major", lw=0.4, alpha=0.5)
        ax.set_title(backbone, fontsize=9, color=colour, fontweight="bold")
        ax.tick_params(labelsize=7)
        if k // ncols == nrows - 1 or k + ncols >= len(order):
            ax.set_xlabel(axis_label(x) + " (log scale)", fontsize=8)
            ax.tick_params(labelbottom=True)
        if k % ncols == 0:
            ax.set_ylabel(axis_label(y) + _ylabel_suffix(data, errors), fontsize=8)
    for k in range(len(order), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)

    handles = [
        Line2D(
            [],
            [],
            ls="",
            marker=EP_STYLE["marker"],
            color=EP_STYLE["color"],
            markeredgecolor="k",
            ms=11,
            label="EP (Efficient Probing)",
        ),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            color="0.45",
            markeredgecolor="white",
            ms=6,
            label="other attentive probes (backbone colour)",
        ),
        Line2D(
            [],
            [],
            ls="",
            marker=_NO_ATTENTION_STYLE["marker"],
            markerfacecolor="white",
            markeredgecolor="k",
            ms=6,
            label="no attention (LP on [CLS], GAP)",
        ),
        Line2D([], [], color="0.3", lw=1.1, drawstyle="steps-post", label="frontier (no probe cheaper and better)"),
    ]
    if errors is not None:
        handles.append(Line2D([], [], color="0.25", lw=0.8, marker="|", ms=8, label=_error_label(data, errors)))
    if chance is not None:
        handles.append(Line2D([], [], color="k", lw=0.8, ls=":", label=f"chance (1/classes = {chance:.3g})"))
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 3), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1 / nrows, 1, 1))

    for k, backbone in enumerate(order):  # labels last: their placement needs the final axes geometry
        ax = axes[k // ncols, k % ncols]
        rows = data[data["backbone"] == backbone]
        tagged = rows[rows["labelled"]].sort_values(["ep", x], ascending=[False, True])
        placements = _place_labels(
            ax,
            tagged[[x, y]].to_numpy(dtype=float),
            tagged[label].astype(str).tolist(),
            tagged["ep"].tolist(),
            rows[[x, y]].to_numpy(dtype=float),
            fontsize=6.5,
        )
        for (_, row), where in zip(tagged.iterrows(), placements):
            ax.annotate(
                str(row[label]),
                (row[x], row[y]),
                xytext=where["offset"],
                textcoords="offset points",
                fontsize=6.5,
                ha="left",
                va="bottom",
                zorder=6,
                color=EP_STYLE["color"] if row["ep"] else "0.1",
                fontweight="bold" if row["ep"] else "normal",
                arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=3) if where["leader"] else None,
            )
    table = data.assign(chance=chance) if chance is not None else data
    table = table.sort_values(["backbone", x], key=lambda c: c.map(order.index) if c.name == "backbone" else c, kind="stable")
    save_figure(fig, table.drop(columns=["no_attention"]).reset_index(drop=True), name, out)
    return fig


def accuracy_vs_params(
    results: pd.DataFrame, y: str = "test_acc", out: str | Path | None = None, name: str = "accuracy_vs_params", **options
) -> plt.Figure:
    """Paper Fig. 2: accuracy against trainable parameters, one point per probe and backbone (see :func:`accuracy_vs_cost`)."""
    return accuracy_vs_cost(results, x="params", y=y, title="Accuracy vs trainable parameters", out=out, name=name, **options)


def accuracy_vs_flops(
    results: pd.DataFrame,
    x: str = "gflops",
    y: str = "test_acc",
    out: str | Path | None = None,
    name: str = "accuracy_vs_gflops",
    **options,
) -> plt.Figure:
    """Paper Fig. 3: accuracy against GFLOPs per image (the probe's by default), one point per probe and backbone."""
    return accuracy_vs_cost(results, x=x, y=y, title="Accuracy vs GFLOPs", out=out, name=name, **options)
