"""Figures. Each function returns a matplotlib Figure and, given `out`, saves the PNG and
the CSV of the data behind it (atomically) as ``<out>/<name>.png`` / ``.csv``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["save_figure", "canvas_gallery", "zoo_overview", "attention_overlays", "upsample_maps", "training_curves", "BACKBONE_PALETTE"]

BACKBONE_PALETTE = {"tiny-mae": "#1f77b4", "tiny-sup": "#ff7f0e", "tiny-random": "#7f7f7f"}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: plt.Figure, data: pd.DataFrame | None, name: str, out: str | Path | None, dpi: int = 150) -> dict[str, Path]:
    """Save `fig` as ``<out>/<name>.png`` and `data` as ``<out>/<name>.csv``; nothing when `out` is None."""
    if out is None:
        return {}
    out = Path(out)
    written = {"png": out / f"{name}.png"}
    _atomic_write(written["png"], lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if data is not None:
        written["csv"] = out / f"{name}.csv"
        _atomic_write(written["csv"], lambda tmp: data.to_csv(tmp, index=False))
    return written


def canvas_gallery(dataset, count: int = 24, columns: int = 8, out: str | Path | None = None, name: str = "canvas_gallery") -> plt.Figure:
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
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=1))
        ax.contour(dataset.masks[i].numpy().astype(float), levels=[0.5], colors="red", linewidths=0.5)
        label = dataset.classes[int(dataset.labels[i])]
        ax.set_title(label, fontsize=7)
        records.append({"index": i, "label": int(dataset.labels[i]), "class": label, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                        "box_area_fraction": (x1 - x0) * (y1 - y0) / image.shape[0] / image.shape[1],
                        "mask_pixels": int(dataset.masks[i].sum())})
    fig.suptitle("Cluttered Fashion-MNIST: canvases, GT boxes (green) and masks (red)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out)
    return fig


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



def upsample_maps(maps: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(..., N) token distributions -> (..., H, W) maps, bilinear, each rescaled to [0, 1]."""
    import torch
    import torch.nn.functional as F

    flat = torch.as_tensor(np.asarray(maps, dtype=np.float32)).reshape(-1, 1, *grid)
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    up = (up - lo) / (hi - lo).clamp_min(1e-12)
    return up.reshape(*np.shape(maps)[:-1], *size).numpy()


def attention_overlays(images, maps: np.ndarray, grid: tuple[int, int], boxes=None, queries: list[int] | None = None,
                       title: str = "", alpha: float = 0.55, out: str | Path | None = None, name: str = "attention_overlays") -> plt.Figure:
    """Images (rows) with their attention maps overlaid: the mean over predictors, then chosen predictors.

    Args:
        images: uint8 (n, 3, H, W) tensor or array.
        maps: (n, K, N) distributions over the N patch tokens.
        grid: Patch grid (rows, cols).
        boxes: Optional (n, 4) GT boxes (x0, y0, x1, y1) in pixels, drawn in green.
        queries: Predictor indices shown one per column (default: the first 4).
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
                ax.imshow(per_query[i, c - 2], cmap="inferno", alpha=alpha, vmin=0, vmax=1)
            if boxes is not None:
                x0, y0, x1, y1 = np.asarray(boxes[i], dtype=float)
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[c], fontsize=7)
        for q in range(k):
            records.append({"image": i, "predictor": q, "max_token": int(maps[i, q].argmax()), "max_weight": float(maps[i, q].max())})
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out)
    return fig


def training_curves(histories: pd.DataFrame, out: str | Path | None = None, name: str = "training_curves") -> plt.Figure:
    """Validation accuracy per epoch (columns epoch, val_acc, and a `run` label per curve)."""
    fig, ax = plt.subplots(figsize=(5.5, 3))
    sns.lineplot(data=histories, x="epoch", y="val_acc", hue="run", marker="o", ms=3, ax=ax)
    ax.set_ylabel("validation top-1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, histories, name, out)
    return fig
