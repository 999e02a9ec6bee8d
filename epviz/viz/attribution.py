"""Figures of the attribution analyses (:mod:`epviz.analysis.attribution`).

Each function returns a matplotlib Figure and, given `out`, saves ``<out>/<name>.png`` and the
CSV of the data behind it through :func:`epviz.viz.save_figure` (atomic writes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from epviz.analysis.stats import spearman
from epviz.viz.maps import gallery_cell, upsample_maps
from epviz.viz.style import axis_label, backbone_colours, backbone_order, require_columns, save_figure, shown_images

__all__ = ["importance_vs_delta_acc", "attribution_gallery", "agreement_summary", "token_image"]

IMPORTANCE_LABELS = {
    "importance_acc": "accuracy drop, pooled slice ablated (captum)",
    "importance_prob": "true-class probability drop, slice ablated",
    "importance_logit": "true-class logit drop, slice ablated",
}


def importance_vs_delta_acc(
    table: pd.DataFrame,
    x: str = "delta_acc",
    y: str = "importance_acc",
    out: str | Path | None = None,
    name: str = "importance_vs_delta_acc",
) -> plt.Figure:
    """One panel per backbone, one numbered point per predictor: ablation importance against Δacc.

    Args:
        table: Output of :func:`epviz.analysis.join_importance` (columns backbone, predictor, `x`, `y`).
        x: Column on the x axis.
        y: Column on the y axis.
        out: Folder for ``<name>.png`` / ``.csv``.
        name: File stem.
    """
    require_columns(table, ["backbone", "predictor", x, y], "importance_vs_delta_acc")
    order = backbone_order(table["backbone"])
    colours = backbone_colours(order)
    fig, axes = plt.subplots(1, len(order), figsize=(3.3 * len(order), 3.1), squeeze=False)
    for ax, backbone in zip(axes[0], order):
        part = table[table["backbone"] == backbone]
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
        ax.scatter(part[x], part[y], s=18, color=colours[backbone])
        for _, row in part.iterrows():
            ax.annotate(str(int(row["predictor"])), (row[x], row[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"{backbone}   Spearman ρ = {spearman(part[x], part[y]).rho:.2f}", fontsize=8)
        ax.set_xlabel(axis_label(x), fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel(IMPORTANCE_LABELS.get(y, axis_label(y)), fontsize=7)
    fig.tight_layout()
    context = [c for c in ("backbone", "layer", "probe", "seed") if c in table.columns]
    save_figure(fig, table[context + ["predictor", x, y]], name, out)
    return fig


def token_image(values: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(n, N) token values -> (n, H, W), each token's value repeated over its patch (signs kept)."""
    values = np.asarray(values, dtype=np.float32)
    rows, cols = grid
    if values.shape[-1] != rows * cols:
        raise ValueError(f"{values.shape[-1]} token values do not fill a {rows}x{cols} grid")
    if size[0] % rows or size[1] % cols:
        raise ValueError(f"image size {tuple(size)} is not a multiple of the grid {tuple(grid)}")
    grid_values = values.reshape(*values.shape[:-1], rows, cols)
    return grid_values.repeat(size[0] // rows, axis=-2).repeat(size[1] // cols, axis=-1)


def _topk_mask(values: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(values.shape, dtype=bool)
    mask[np.argsort(-values, kind="stable")[:k]] = True
    return mask


def attribution_gallery(
    images,
    attributions: np.ndarray,
    maps: np.ndarray,
    grid: tuple[int, int],
    boxes=None,
    k: int = 8,
    title: str = "",
    out: str | Path | None = None,
    name: str = "attribution_gallery",
    index: Sequence[int] | None = None,
    evidence: np.ndarray | None = None,
) -> plt.Figure:
    """Per image: the canvas, the mean attention map, the token relevance, and both top-k sets.

    The relevance column uses captum's ``visualize_image_attr`` (blended heat map, both signs:
    green for tokens that raise the explained logit, red for those that lower it). Given `evidence`,
    a column of each token's exact contribution to the same logit follows it, drawn the same way.

    Args:
        images: uint8 (n, 3, H, W) tensor or array.
        attributions: (n, N) token relevance (see :func:`epviz.analysis.token_attribution`).
        maps: (n, K, N) attention maps of the same images.
        grid: Patch grid (rows, cols).
        boxes: Optional (n, 4) GT boxes (x0, y0, x1, y1) in pixels, drawn in green.
        k: Size of the top-k sets (last column: attention only blue, relevance only orange, both white).
        title: Figure title.
        out: Folder for ``<name>.png`` / ``.csv`` (one row per image: spearman, topk_overlap, ...) / ``.json``.
        name: File stem.
        index: Dataset positions of the images, recorded in the provenance sidecar (default: their
            positions in `images`).
        evidence: Optional (n, N) exact per-token contributions to the explained logit
            (:meth:`epviz.probes.Probe.evidence`, summed over predictors).
    """
    from captum.attr import visualization as viz

    from epviz.analysis.attribution import attention_agreement

    images = np.asarray(images)
    attributions = np.asarray(attributions, dtype=np.float32)
    maps = np.asarray(maps, dtype=np.float32)
    evidence = None if evidence is None else np.asarray(evidence, dtype=np.float32)
    shapes_agree = attributions.shape == (maps.shape[0], maps.shape[2]) and (
        evidence is None or evidence.shape == attributions.shape
    )
    if maps.ndim != 3 or not shapes_agree or len(images) != len(maps):
        raise ValueError(
            f"need images (n, 3, H, W), attributions and evidence (n, N) and maps (n, K, N) of the same n and N; "
            f"got {images.shape}, {attributions.shape}, {None if evidence is None else evidence.shape}, {maps.shape}"
        )
    n = len(images)
    size = images.shape[-2:]
    agreement = attention_agreement(attributions, maps, k=k)
    mean_maps = maps.mean(1)
    attention_up = upsample_maps(mean_maps, grid, size)
    signed = {"relevance (IG)": token_image(attributions, grid, size)}
    if evidence is not None:
        signed["exact evidence"] = token_image(evidence, grid, size)
    columns = ["image", "mean attention", *signed, f"top-{k}: attention / IG / both"]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.7 * len(columns), 1.75 * n), squeeze=False)
    for i in range(n):
        rgb = images[i].transpose(1, 2, 0)
        grey = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
        axes[i, 0].imshow(rgb, interpolation="nearest")
        axes[i, 1].imshow(rgb, interpolation="nearest")
        axes[i, 1].imshow(attention_up[i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        for c, values in enumerate(signed.values(), start=2):
            viz.visualize_image_attr(
                values[i][..., None],
                grey,
                method="blended_heat_map",
                sign="all",
                plt_fig_axis=(fig, axes[i, c]),
                alpha_overlay=0.6,
                use_pyplot=False,
            )
        top_attention = _topk_mask(mean_maps[i], k)
        top_relevance = _topk_mask(attributions[i], k)
        overlay = np.zeros((*grid, 4))
        overlay[(top_attention & ~top_relevance).reshape(grid)] = (0.2, 0.4, 1.0, 0.75)
        overlay[(top_relevance & ~top_attention).reshape(grid)] = (1.0, 0.55, 0.0, 0.75)
        overlay[(top_relevance & top_attention).reshape(grid)] = (1.0, 1.0, 1.0, 0.85)
        axes[i, -1].imshow(rgb, interpolation="nearest")
        axes[i, -1].imshow(overlay, interpolation="nearest", extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5))
        row = agreement.iloc[i]
        axes[i, -1].text(
            1,
            size[0] - 2,
            f"ρ={row['spearman']:.2f}  ov={row['topk_overlap']:.2f}",
            color="w",
            fontsize=5.5,
            bbox=dict(facecolor="black", alpha=0.5, pad=0.5, lw=0),
        )
        for c, ax in enumerate(axes[i]):
            gallery_cell(ax, None if boxes is None else boxes[i], columns[c] if i == 0 else None)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    data = agreement[["image", "spearman", "topk_overlap", "k", "chance_overlap"]].assign(
        attribution_sum=attributions.astype(np.float64).sum(-1),
        max_attention_token=mean_maps.argmax(-1),
        max_relevance_token=attributions.argmax(-1),
    )
    if evidence is not None:
        data = data.assign(evidence_sum=evidence.astype(np.float64).sum(-1), max_evidence_token=evidence.argmax(-1))
    save_figure(fig, data, name, out, provenance=shown_images(range(n), index))
    return fig


def agreement_summary(table: pd.DataFrame, out: str | Path | None = None, name: str = "attribution_agreement") -> plt.Figure:
    """Per backbone, the distribution over images of the rank correlation and the top-k overlap.

    Args:
        table: Output of :func:`epviz.analysis.attention_agreement` (or the ``table`` of
            :func:`epviz.analysis.attribution_vs_attention`) for several backbones, rows of map "mean".
        out: Folder for ``<name>.png`` / ``.csv``.
        name: File stem.
    """
    require_columns(table, ["backbone", "spearman", "topk_overlap", "chance_overlap"], "agreement_summary")
    data = table[table["map"] == "mean"] if "map" in table.columns else table
    order = backbone_order(data["backbone"])
    colours = backbone_colours(order)
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for ax, column, chance, label in (
        (axes[0], "spearman", 0.0, "Spearman ρ (relevance vs attention), per image"),
        (axes[1], "topk_overlap", float(data["chance_overlap"].iloc[0]), "top-k overlap, per image"),
    ):
        values = [data.loc[data["backbone"] == b, column].dropna().to_numpy() for b in order]
        parts = ax.violinplot([v if len(v) else np.array([np.nan]) for v in values], showmeans=True, showextrema=False)
        parts["cmeans"].set_color("k")
        for body, backbone in zip(parts["bodies"], order):
            body.set_facecolor(colours[backbone])
            body.set_alpha(0.6)
        ax.axhline(chance, color="k", ls="--", lw=0.8, label="chance" if column == "topk_overlap" else "no correlation")
        ax.set_xticks(range(1, len(order) + 1), order, fontsize=7)
        ax.set_ylabel(label, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylim(-1.05, 1.05)
    axes[1].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    context = [c for c in ("backbone", "layer", "probe", "seed") if c in data.columns]
    save_figure(
        fig,
        data[context + [c for c in ("image", "map", "spearman", "topk_overlap", "k", "chance_overlap") if c in data.columns]],
        name,
        out,
    )
    return fig
