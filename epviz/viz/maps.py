"""Attention maps on images: upsampling, GT boxes, overlays, query colours, galleries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from epviz.viz.style import save_figure, shown_images

__all__ = [
    "GROUP_COLOURS",
    "alpha_cmap",
    "attention_overlays",
    "canvas_gallery",
    "composite_overlay",
    "draw_boxes",
    "group_colours",
    "heat_overlay",
    "query_colours",
    "query_group_gallery",
    "upsample_maps",
]

GROUP_COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#f781bf", "#a65628", "#ffd92f", "#17becf", "#999999", "#000000")


def draw_boxes(ax, boxes, lw: float = 0.8) -> None:
    """Draw GT boxes (one (4,) or several (k, 4) xyxy pixel boxes, exclusive x1, y1) in lime on an image axis."""
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=lw))


def gallery_cell(ax, boxes=None, title: str | None = None, **title_style) -> None:
    """Finish one image cell of a gallery: its GT boxes (when given), no ticks, a column title (first row)."""
    if boxes is not None:
        draw_boxes(ax, boxes)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, **{"fontsize": 7, **title_style})


def upsample_maps(maps: np.ndarray, grid: tuple[int, int], size: tuple[int, int], rescale: bool = True) -> np.ndarray:
    """(..., N) token maps -> (..., H, W) maps, bilinear, each rescaled to [0, 1] (`rescale`) or as they are."""
    import torch
    import torch.nn.functional as F

    flat = torch.as_tensor(np.asarray(maps, dtype=np.float32)).reshape(-1, 1, *grid)
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)[:, 0]
    if not rescale:
        return up.reshape(*np.shape(maps)[:-1], *size).numpy()
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    up = (up - lo) / (hi - lo).clamp_min(1e-12)
    return up.reshape(*np.shape(maps)[:-1], *size).numpy()


def query_colours(k: int) -> list[tuple[float, float, float]]:
    """A distinct colour per predictor (evenly spaced hues)."""
    import seaborn as sns

    return [tuple(c) for c in sns.color_palette("husl", k)]


def group_colours(g: int) -> list[tuple[float, float, float]]:
    """The group colours of :func:`epviz.plots.query_group_gallery`."""
    from matplotlib.colors import to_rgb

    return [to_rgb(GROUP_COLOURS[i % len(GROUP_COLOURS)]) for i in range(g)]


def heat_overlay(token_map: np.ndarray, grid: tuple[int, int], size: tuple[int, int], opacity: float) -> np.ndarray:
    """(H, W, 4) inferno overlay of one (N,) map, upsampled and min-max normalised."""
    from matplotlib import colormaps

    up = upsample_maps(token_map[None], grid, size)[0]
    rgba = colormaps["inferno"](up)
    rgba[..., 3] = opacity
    return rgba.astype(np.float32)


def signed_overlay(token_map: np.ndarray, grid: tuple[int, int], size: tuple[int, int], opacity: float) -> np.ndarray:
    """(H, W, 4) overlay of one signed (N,) map: red for evidence for, blue against, opaque as |value| / max |value|."""
    from matplotlib import colormaps

    scale = float(np.abs(token_map).max()) or 1.0
    up = upsample_maps(np.asarray(token_map, dtype=np.float32)[None] / scale, grid, size, rescale=False)[0]
    rgba = colormaps["RdBu_r"]((up + 1) / 2)
    rgba[..., 3] = opacity * np.abs(up)
    return rgba.astype(np.float32)


def composite_overlay(
    maps: np.ndarray, grid: tuple[int, int], size: tuple[int, int], colours: Sequence, opacity: float
) -> np.ndarray:
    """(H, W, 4): each pixel in the colour of the strongest of the (M, N) maps, opaque as that map."""
    up = upsample_maps(maps, grid, size)  # (M, H, W), each in [0, 1]
    winner = up.argmax(0)
    rgba = np.zeros((*size, 4), np.float32)
    rgba[..., :3] = np.asarray(colours, np.float32)[winner]
    rgba[..., 3] = opacity * up.max(0)
    return rgba


def alpha_cmap(colour: str):
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    rgb = to_rgb(colour)
    return LinearSegmentedColormap.from_list(f"alpha-{colour}", [(*rgb, 0.0), (*rgb, 1.0)])


def canvas_gallery(
    dataset, count: int = 24, columns: int = 8, out: str | Path | None = None, name: str = "canvas_gallery"
) -> plt.Figure:
    """A grid of canvases with their ground-truth boxes (green) and mask outlines (red)."""
    count = min(count, len(dataset))
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    records = []
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        image = dataset.images[i].permute(1, 2, 0).numpy()
        x0, y0, x1, y1 = dataset.boxes[i].tolist()
        ax.imshow(image, interpolation="nearest")
        draw_boxes(ax, dataset.boxes[i], lw=1)
        ax.contour(dataset.masks[i].numpy().astype(float), levels=[0.5], colors="red", linewidths=0.5)
        label = dataset.classes[int(dataset.labels[i])]
        ax.set_title(label, fontsize=7)
        records.append(
            {
                "index": i,
                "label": int(dataset.labels[i]),
                "class": label,
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "box_area_fraction": (x1 - x0) * (y1 - y0) / image.shape[0] / image.shape[1],
                "mask_pixels": int(dataset.masks[i].sum()),
            }
        )
    fig.suptitle("Cluttered Fashion-MNIST: canvases, GT boxes (green) and masks (red)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out, provenance=shown_images(range(count), None, dataset))
    return fig


def attention_overlays(
    images,
    maps: np.ndarray,
    grid: tuple[int, int],
    boxes=None,
    queries: list[int] | None = None,
    title: str = "",
    alpha: float = 0.55,
    out: str | Path | None = None,
    name: str = "attention_overlays",
    index: Sequence[int] | None = None,
) -> plt.Figure:
    """Images (rows) with their attention maps overlaid: the mean over predictors, then chosen predictors.

    Args:
        images: uint8 (n, 3, H, W) tensor or array.
        maps: (n, K, N) distributions over the N patch tokens.
        grid: Patch grid (rows, cols).
        boxes: Optional (n, 4) GT boxes (x0, y0, x1, y1) in pixels, drawn in green.
        queries: Predictor indices shown one per column (default: the first 4).
        out: Folder for ``<name>.png`` / ``.csv`` / ``.json``.
        name: File stem.
        index: Dataset positions of the images, recorded in the provenance sidecar (default: their
            positions in `images`).
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float32)
    n, k = maps.shape[:2]
    queries = list(range(min(4, k))) if queries is None else list(queries)
    size = images.shape[-2:]
    columns = ["image", "mean of predictors"] + [f"predictor {q}" for q in queries]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.55 * len(columns), 1.6 * n), squeeze=False)
    mean_maps = upsample_maps(maps.mean(1), grid, size)
    per_query = upsample_maps(maps[:, queries], grid, size) if queries else None
    records = []
    for i in range(n):
        rgb = images[i].transpose(1, 2, 0)
        for c, ax in enumerate(axes[i]):
            ax.imshow(rgb, interpolation="nearest")
            if c == 1:
                ax.imshow(mean_maps[i], cmap="inferno", alpha=alpha, vmin=0, vmax=1)
            elif c > 1:
                assert per_query is not None  # columns past the second exist only when queries do
                ax.imshow(per_query[i, c - 2], cmap="inferno", alpha=alpha, vmin=0, vmax=1)
            gallery_cell(ax, None if boxes is None else boxes[i], columns[c] if i == 0 else None)
        for q in range(k):
            records.append(
                {"image": i, "predictor": q, "max_token": int(maps[i, q].argmax()), "max_weight": float(maps[i, q].max())}
            )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out, provenance=shown_images(range(n), index))
    return fig


def query_group_gallery(
    images,
    maps: np.ndarray,
    labels,
    grid: tuple[int, int],
    boxes=None,
    queries: list[int] | None = None,
    alpha: float = 0.85,
    title: str = "",
    out: str | Path | None = None,
    name: str = "query_groups",
    index: Sequence[int] | None = None,
) -> plt.Figure:
    """Complementary maps: per image, all groups in one picture (one colour per group), each
    group's map, then single predictors drawn in their group's colour.

    Args:
        images: uint8 (n, 3, H, W) tensor or array.
        maps: (n, K, N) per-predictor distributions over the N patch tokens.
        labels: Group of each predictor, (K,) (see :func:`epviz.analysis.query_groups`).
        grid: Patch grid (rows, cols).
        boxes: Optional (n, 4) or per-image (k, 4) GT boxes (x0, y0, x1, y1) pixels, drawn in green.
        queries: Predictors shown one per column (default: up to 8, every group represented, in group order).
        alpha: Opacity of the maps at their peak.
        title: Figure title.
        out: Folder for ``<name>.png`` / ``.csv`` (one row per image x map: kind, map, group, peak) / ``.json``.
        name: File stem.
        index: Dataset positions of the images, recorded in the provenance sidecar (default: their
            positions in `images`).
    """
    from matplotlib.colors import to_rgb

    from epviz.analysis.query_groups import group_maps

    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if maps.ndim != 3 or labels.shape != (maps.shape[1],):
        raise ValueError(f"maps must be (images, K, tokens) and labels (K,); got {maps.shape} and {labels.shape}")
    if len(images) != len(maps):
        raise ValueError(f"got {len(images)} images but maps of {len(maps)}")
    n, k, _ = maps.shape
    g = int(labels.max()) + 1
    colours = [GROUP_COLOURS[i % len(GROUP_COLOURS)] for i in range(g)]
    if queries is None:
        by_group = [list(np.flatnonzero(labels == i)) for i in range(g)]
        queries = []
        while len(queries) < min(8, k):  # round-robin over the groups
            for members in by_group:
                if members and len(queries) < min(8, k):
                    queries.append(int(members.pop(0)))
        queries = sorted(queries, key=lambda q: (labels[q], q))
    queries = [int(q) for q in queries]
    size = images.shape[-2:]
    grouped = group_maps(maps, labels)
    up_groups = upsample_maps(grouped, grid, size)  # (n, G, H, W) in [0, 1]
    up_queries = upsample_maps(maps[:, queries], grid, size) if queries else np.zeros((n, 0, *size))
    columns = (
        ["image", "all groups"]
        + [f"group {i} ({int((labels == i).sum())})" for i in range(g)]
        + [f"predictor {q}" for q in queries]
    )
    col_colours = ["k", "k"] + colours + [colours[labels[q]] for q in queries]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.35 * len(columns), 1.45 * n), squeeze=False)
    records = []
    for i in range(n):
        rgb = images[i].transpose(1, 2, 0)
        winner = up_groups[i].argmax(0)
        strength = up_groups[i].max(0)
        composite = np.zeros((*size, 4))
        for grp in range(g):
            composite[winner == grp, :3] = to_rgb(colours[grp])
        composite[..., 3] = alpha * strength
        for c, ax in enumerate(axes[i]):
            ax.imshow(rgb, interpolation="nearest")
            if c == 1:
                ax.imshow(composite, interpolation="nearest")
            elif 2 <= c < 2 + g:
                ax.imshow(up_groups[i, c - 2], cmap=alpha_cmap(colours[c - 2]), vmin=0, vmax=1 / alpha)
            elif c >= 2 + g:
                q = queries[c - 2 - g]
                ax.imshow(up_queries[i, c - 2 - g], cmap=alpha_cmap(colours[labels[q]]), vmin=0, vmax=1 / alpha)
            gallery_cell(
                ax, None if boxes is None else boxes[i], columns[c] if i == 0 else None, fontsize=6.5, color=col_colours[c]
            )
        for grp in range(g):
            records.append(
                {
                    "image": i,
                    "kind": "group",
                    "map": grp,
                    "group": grp,
                    "members": int((labels == grp).sum()),
                    "peak_token": int(grouped[i, grp].argmax()),
                    "peak_weight": float(grouped[i, grp].max()),
                }
            )
        for q in range(k):
            records.append(
                {
                    "image": i,
                    "kind": "predictor",
                    "map": q,
                    "group": int(labels[q]),
                    "members": 1,
                    "peak_token": int(maps[i, q].argmax()),
                    "peak_weight": float(maps[i, q].max()),
                }
            )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out, dpi=110, provenance=shown_images(range(n), index))
    return fig
