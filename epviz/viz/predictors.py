"""Per-predictor figures (paper Fig. 4): accuracy drop against a property of the predictor's map."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from epviz.analysis.stats import spearman
from epviz.viz.style import axis_label, backbone_order, require_columns, save_figure

__all__ = ["delta_acc_panels"]


def delta_acc_panels(table: pd.DataFrame, x: str = "maxboxacc_v2", y: str = "delta_acc",
                     panels: dict[str, list[str]] | None = None, out: str | Path | None = None,
                     name: str = "delta_acc_vs_localization") -> plt.Figure:
    """Paper Fig. 4: one point per attention predictor, its accuracy drop against a property of its map.

    Rows of panels are backbones, columns the `panels` (e.g. several attentive probes on the
    left, EP with several D_o on the right); colours are probes, consistent across panels.
    Each panel shows the Spearman rank correlation of its points.

    Args:
        table: One row per predictor with columns ``backbone``, ``probe``, `x`, `y`
            (see :func:`epviz.analysis.predictor_table`).
        x: The map property: ``maxboxacc_v2``, ``inbox_mass``, ``pointing``, ``entropy``, ``entropy_norm``...
        y: The accuracy drop column.
        panels: Panel title -> probe labels it shows (default: one panel with every probe).
        out: Folder for ``<name>.png`` / ``.csv``; None saves nothing.
        name: File stem.
    """
    require_columns(table, ["backbone", "probe", x, y], "delta_acc_panels")
    probes = list(dict.fromkeys(table["probe"]))
    panels = {"probes": probes} if panels is None else {k: list(v) for k, v in panels.items()}
    unknown = sorted({p for members in panels.values() for p in members} - set(probes))
    if unknown:
        raise ValueError(f"panels name probes {unknown} that are not in the table (it has {probes})")
    shown = list(dict.fromkeys(p for members in panels.values() for p in members))
    hue = dict(zip(shown, sns.color_palette("tab10", max(10, len(shown))).as_hex()))
    backbones = backbone_order(table["backbone"])
    fig, axes = plt.subplots(len(backbones), len(panels), figsize=(3.6 * len(panels), 2.9 * len(backbones)),
                             squeeze=False, sharex=True, sharey=True)
    parts = []
    for r, backbone in enumerate(backbones):
        for c, (title, members) in enumerate(panels.items()):
            ax = axes[r, c]
            rows = table[(table["backbone"] == backbone) & table["probe"].isin(members)]
            for probe in members:
                pts = rows[rows["probe"] == probe]
                if len(pts):
                    ax.scatter(pts[x], pts[y], s=16, color=hue[probe], label=probe, alpha=0.85, edgecolor="none")
            ax.axhline(0, color="k", lw=0.6, ls=":")
            if x == "inbox_mass" and "chance_mass" in rows and len(rows):
                ax.axvline(float(rows["chance_mass"].mean()), color="0.4", lw=0.8, ls="--", label="chance (box area)")
            rho = spearman(rows[x], rows[y]).rho if len(rows) > 2 else float("nan")
            if np.isfinite(rho):
                ax.text(0.03, 0.95, f"ρ = {rho:+.2f}", transform=ax.transAxes, fontsize=7, va="top")
            ax.set_title(f"{backbone} · {title}", fontsize=8)
            if r == len(backbones) - 1:
                ax.set_xlabel(axis_label(x), fontsize=8)
            if c == 0:
                ax.set_ylabel("Δacc (uniform predictor)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
            parts.append(rows.assign(panel=title))
    fig.tight_layout()
    save_figure(fig, pd.concat(parts, ignore_index=True), name, out)
    return fig
