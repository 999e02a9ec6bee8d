"""Per-predictor figures (paper Fig. 4): accuracy drop against a property of the predictor's map."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from epviz.analysis.stats import spearman
from epviz.viz.style import axis_label, backbone_order, require_columns, save_figure

__all__ = ["BASELINE_STYLES", "delta_acc_panels"]

BASELINE_STYLES = {  # line style of each trivial map of epviz.analysis.baselines
    "uniform": dict(color="0.45", ls=":", lw=1.0),
    "centre prior": dict(color="0.25", ls="-.", lw=1.0),
    "random, matched entropy": dict(color="0.1", ls=(0, (4, 2)), lw=0.9),
}


def _baseline_lines(
    ax, baselines: pd.DataFrame, x: str, backbone: str, members: list[str], hue: dict[str, str], chance_drawn: bool
) -> pd.DataFrame:
    """Draw the vertical line of every baseline that applies to a panel; return the rows drawn."""
    rows = baselines
    if "backbone" in rows.columns:
        rows = rows[rows["backbone"].isna() | (rows["backbone"] == backbone)]
    if "probe" in rows.columns:
        rows = rows[rows["probe"].isna() | rows["probe"].isin(members)]
    rows = rows[rows[x].notna()]
    if chance_drawn:  # the uniform map's in-box mass is the chance line already drawn
        rows = rows[rows["baseline"] != "uniform"]
    for _, row in rows.iterrows():
        style = dict(BASELINE_STYLES.get(row["baseline"], dict(color="0.3", ls="--", lw=0.8)))
        probe = row.get("probe") if "probe" in rows.columns else None
        label = str(row["baseline"])
        if isinstance(probe, str):
            style["color"] = hue.get(probe, style["color"])
            label = f"{label} ({probe})"
        ax.axvline(float(row[x]), label=label, zorder=1, **style)
        ax.text(float(row[x]), 0.02, f" {label}", rotation=90, fontsize=5, color=style["color"], va="bottom",
                transform=ax.get_xaxis_transform())  # fmt: skip
    return rows


def _rho_lines(rows: pd.DataFrame, members: list[str], x: str, y: str, rhos: pd.DataFrame | None) -> list[tuple[str, str]]:
    """Per probe of a panel, the text of its Spearman ρ of `x` and `y` across its predictors: with the interval and the
    partial ρ given another column where `rhos` (rows of :func:`epviz.analysis.spearman_intervals`) has them, else the
    point ρ."""
    if rhos is not None:
        rhos = rhos[((rhos["x"] == x) & (rhos["y"] == y)) | ((rhos["x"] == y) & (rhos["y"] == x))]
    lines = []
    for probe in members:
        pts = rows[rows["probe"] == probe]
        if len(pts) < 3:
            continue
        found = None if rhos is None else rhos[(rhos["probe"] == probe) & (rhos["backbone"] == pts["backbone"].iloc[0])]
        if found is None or not len(found):
            rho = spearman(pts[x], pts[y]).rho
            lines.append((probe, f"ρ {rho:+.2f}" if np.isfinite(rho) else "ρ n/a"))
            continue
        parts = []
        for r in found.itertuples(index=False):
            name = f"ρ | {r.given.split('_')[0]}" if isinstance(r.given, str) else "ρ"
            parts.append(f"{name} {r.rho:+.2f} [{r.rho_lo:+.2f}, {r.rho_hi:+.2f}]" if np.isfinite(r.rho) else f"{name} n/a")
        lines.append((probe, "; ".join(parts)))
    return lines


def delta_acc_panels(
    table: pd.DataFrame,
    x: str = "maxboxacc_v2",
    y: str = "delta_acc",
    panels: dict[str, list[str]] | None = None,
    out: str | Path | None = None,
    name: str = "delta_acc_vs_localization",
    baselines: pd.DataFrame | None = None,
    rhos: pd.DataFrame | None = None,
) -> plt.Figure:
    """Paper Fig. 4: one point per attention predictor, its accuracy drop against a property of its map.

    Rows of panels are backbones, columns the `panels` (e.g. several attentive probes on the
    left, EP with several D_o on the right); colours are probes, consistent across panels.
    Each panel prints, per probe, the Spearman ρ of its predictors (never one pooled over probes): with its
    interval, and the partial ρ given another column, where `rhos` has them. A panel shows at most 5 probes
    (the legend lists only them; baseline lines are labelled in place). A localization measure is drawn
    with its chance lines: 0 for a lift, the box-area chance of ``inbox_mass`` (from ``chance_mass``), and the
    scores of the trivial maps in `baselines` as vertical lines (the matched-entropy baseline of
    a probe in that probe's colour).

    Args:
        table: One row per predictor with columns ``backbone``, ``probe``, `x`, `y`
            (see :func:`epviz.analysis.predictor_table`).
        x: The map property: ``mask_lift`` (the lead), ``box_lift``, ``maxboxacc_v2``, ``inbox_mass``, ``pointing``,
            ``entropy_norm``...
        y: The accuracy drop column.
        panels: Panel title -> probe labels it shows (default: one panel with every probe).
        out: Folder for ``<name>.png`` / ``.csv``; None saves nothing.
        name: File stem.
        baselines: Trivial maps' scores, one row per baseline with a ``baseline`` column and `x`
            (:func:`epviz.analysis.localization_baselines`, :func:`epviz.analysis.matched_entropy_baselines`);
            a row with a ``backbone`` is drawn only in that backbone's panels, one with a ``probe``
            only in panels showing that probe. Rows without `x` are not drawn, nor any for an entropy `x`
            (the random baseline has the probe's entropy by construction). The CSV lists the
            drawn lines as extra rows with their ``baseline`` name (and no `y`).
        rhos: Rows of :func:`epviz.analysis.spearman_intervals` (``backbone``, ``probe``, ``x``, ``y``, ``given``,
            ``rho``, ``rho_lo``, ``rho_hi``): the ρ printed for the pair of `x` and `y`, with intervals.
    """
    require_columns(table, ["backbone", "probe", x, y], "delta_acc_panels")
    if baselines is not None:
        require_columns(baselines, ["baseline"], "delta_acc_panels(baselines=...)")
    probes = list(dict.fromkeys(table["probe"]))
    panels = {"probes": probes} if panels is None else {k: list(v) for k, v in panels.items()}
    unknown = sorted({p for members in panels.values() for p in members} - set(probes))
    if unknown:
        raise ValueError(f"panels name probes {unknown} that are not in the table (it has {probes})")
    crowded = {title: len(members) for title, members in panels.items() if len(members) > 5}
    if crowded:
        raise ValueError(f"a panel shows at most 5 probes, got {crowded}: split it into more panels")
    shown = list(dict.fromkeys(p for members in panels.values() for p in members))
    hue = dict(zip(shown, sns.color_palette("tab10", max(10, len(shown))).as_hex()))
    backbones = backbone_order(table["backbone"])
    fig, axes = plt.subplots(
        len(backbones), len(panels), figsize=(3.6 * len(panels), 2.9 * len(backbones)), squeeze=False, sharex=True, sharey=True
    )
    parts = []
    for r, backbone in enumerate(backbones):
        for c, (title, members) in enumerate(panels.items()):
            ax = axes[r, c]
            rows = table[(table["backbone"] == backbone) & table["probe"].isin(members)]
            handles = []
            for probe in members:
                pts = rows[rows["probe"] == probe]
                if len(pts):
                    handles.append(ax.scatter(pts[x], pts[y], s=16, color=hue[probe], label=probe, alpha=0.85, edgecolor="none"))
            ax.axhline(0, color="k", lw=0.6, ls=":")
            chance_drawn = (x == "inbox_mass" and "chance_mass" in rows and len(rows) > 0) or x.endswith("lift")
            if chance_drawn:
                at = 0.0 if x.endswith("lift") else float(rows["chance_mass"].mean())
                ax.axvline(at, color="0.4", lw=0.8, ls="--", label="chance (uniform map)")
                ax.text(at, 0.02, " chance (uniform map)", rotation=90, fontsize=5, color="0.4", va="bottom",
                        transform=ax.get_xaxis_transform())  # fmt: skip
            if baselines is not None and x in baselines.columns and not x.startswith("entropy"):  # matched by design
                drawn = _baseline_lines(ax, baselines, x, backbone, members, hue, chance_drawn)
                keep = [c for c in ("backbone", "probe", "baseline", x) if c in drawn.columns]
                parts.append(drawn[keep].assign(backbone=backbone, panel=title))
            for i, (probe, text) in enumerate(_rho_lines(rows, members, x, y, rhos)):
                ax.text(0.03, 0.96 - 0.07 * i, text, transform=ax.transAxes, fontsize=5.5, va="top", color=hue[probe])
            ax.set_title(f"{backbone} · {title}", fontsize=8)
            if r == len(backbones) - 1:
                ax.set_xlabel(axis_label(x), fontsize=8)
            if c == 0:
                ax.set_ylabel("Δacc (uniform predictor)" if y == "delta_acc" else axis_label(y), fontsize=8)
            ax.tick_params(labelsize=7)
            if handles:
                ax.legend(handles=handles, fontsize=6, loc="lower right")  # the probes; lines are labelled in place
            parts.append(rows.assign(panel=title))
    fig.tight_layout()
    save_figure(fig, pd.concat(parts, ignore_index=True), name, out)
    return fig
