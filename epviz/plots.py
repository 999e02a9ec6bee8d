"""Figures. Each function returns a matplotlib Figure and, given `out`, saves the PNG and
the CSV of the data behind it (atomically) as ``<out>/<name>.png`` / ``.csv``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from epviz.atomic import atomic_write

__all__ = ["save_figure", "draw_boxes", "canvas_gallery", "zoo_overview", "attention_overlays", "upsample_maps", "training_curves", "BACKBONE_PALETTE"]

BACKBONE_PALETTE = {"tiny-mae": "#1f77b4", "tiny-sup": "#ff7f0e", "tiny-random": "#7f7f7f"}


def save_figure(fig: plt.Figure, data: pd.DataFrame | None, name: str, out: str | Path | None, dpi: int = 150) -> dict[str, Path]:
    """Save `fig` as ``<out>/<name>.png`` and `data` as ``<out>/<name>.csv``; nothing when `out` is None."""
    if out is None:
        return {}
    out = Path(out)
    written = {"png": out / f"{name}.png"}
    atomic_write(written["png"], lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if data is not None:
        written["csv"] = out / f"{name}.csv"
        atomic_write(written["csv"], lambda tmp: data.to_csv(tmp, index=False))
    return written


def draw_boxes(ax, boxes, lw: float = 0.8) -> None:
    """Draw GT boxes (one (4,) or several (k, 4) xyxy pixel boxes, exclusive x1, y1) in lime on an image axis."""
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=lw))


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
        draw_boxes(ax, dataset.boxes[i], lw=1)
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
                draw_boxes(ax, boxes[i])
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


# --- figures of the analysis notebooks ---------------------------------------------------

__all__ += [
    "backbone_colours", "accuracy_vs_cost", "accuracy_vs_params", "accuracy_vs_flops", "delta_acc_panels",
    "layer_curves", "low_shot_curves", "query_group_gallery", "GROUP_COLOURS", "METRIC_LABELS",
]

GROUP_COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#f781bf", "#a65628", "#ffd92f", "#17becf", "#999999", "#000000")
METRIC_LABELS = {
    "maxboxacc_v2": "MaxBoxAccV2 (localization)",
    "inbox_mass": "attention mass inside the GT box",
    "pointing": "pointing game (argmax in box)",
    "entropy": "entropy of the map (nats)",
    "entropy_norm": "entropy / log N (1 = uniform)",
    "delta_acc": "Δacc when the predictor is made uniform",
    "params": "trainable parameters",
    "gflops": "probe GFLOPs per image",
    "total_gflops": "backbone + probe GFLOPs per image",
    "test_acc": "top-1 accuracy (test)",
    "val_acc": "top-1 accuracy (val)",
    "best_acc": "top-1 accuracy (val, best epoch)",
    "final_acc": "top-1 accuracy (val, last epoch)",
}


def _label(column: str) -> str:
    return METRIC_LABELS.get(column, column.replace("_", " "))


def _require(data: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(f"{what} needs the columns {missing}; the table has {list(data.columns)}")
    if len(data) == 0:
        raise ValueError(f"{what} got an empty table: there is nothing to draw")


def backbone_colours(names) -> dict[str, str]:
    """A colour per backbone: the zoo's fixed colours, then tab10 colours for any other name."""
    spare = [c for c in sns.color_palette("tab10").as_hex() if c not in BACKBONE_PALETTE.values()]
    out, k = {}, 0
    for name in dict.fromkeys(names):
        if name in BACKBONE_PALETTE:
            out[name] = BACKBONE_PALETTE[name]
        else:
            out[name] = spare[k % len(spare)]
            k += 1
    return out


def _backbone_order(names) -> list[str]:
    present = list(dict.fromkeys(names))
    return [b for b in BACKBONE_PALETTE if b in present] + [b for b in present if b not in BACKBONE_PALETTE]


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
    _require(results, ["backbone", label, x, y], "accuracy_vs_cost")
    cost = pd.to_numeric(results[x], errors="coerce")
    if not (cost > 0).all():
        bad = results.loc[~(cost > 0), label].tolist()
        raise ValueError(f"{x} must be positive for a log axis; rows {bad} are not")
    order = _backbone_order(results["backbone"])
    colours = backbone_colours(order)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for backbone in order:
        rows = results[results["backbone"] == backbone]
        ax.scatter(rows[x], rows[y], s=30, color=colours[backbone], label=backbone, edgecolor="white", linewidth=0.5, zorder=3)
        for _, row in rows.iterrows():
            ax.annotate(str(row[label]), (row[x], row[y]), xytext=(3, 2), textcoords="offset points", fontsize=6,
                        color=colours[backbone])
    ax.set_xscale("log")
    ax.set_xlabel(_label(x) + " (log scale)")
    ax.set_ylabel(_label(y))
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


def delta_acc_panels(table: pd.DataFrame, x: str = "maxboxacc_v2", y: str = "delta_acc",
                     panels: dict[str, list[str]] | None = None, out: str | Path | None = None,
                     name: str = "delta_acc_vs_localization") -> plt.Figure:
    """Paper Fig. 4: one point per attention predictor, its accuracy drop against a property of its map.

    Rows of panels are backbones, columns the `panels` (e.g. several attentive probes on the
    left, EP with several D_o on the right); colours are probes, consistent across panels.
    Each panel shows the Spearman rank correlation of its points.

    Args:
        table: One row per predictor with columns ``backbone``, ``probe``, `x`, `y`
            (see :func:`epviz.experiments.predictor_table`).
        x: The map property: ``maxboxacc_v2``, ``inbox_mass``, ``pointing``, ``entropy``, ``entropy_norm``...
        y: The accuracy drop column.
        panels: Panel title -> probe labels it shows (default: one panel with every probe).
        out: Folder for ``<name>.png`` / ``.csv``; None saves nothing.
        name: File stem.
    """
    from scipy.stats import spearmanr

    _require(table, ["backbone", "probe", x, y], "delta_acc_panels")
    probes = list(dict.fromkeys(table["probe"]))
    panels = {"probes": probes} if panels is None else {k: list(v) for k, v in panels.items()}
    unknown = sorted({p for members in panels.values() for p in members} - set(probes))
    if unknown:
        raise ValueError(f"panels name probes {unknown} that are not in the table (it has {probes})")
    shown = list(dict.fromkeys(p for members in panels.values() for p in members))
    hue = dict(zip(shown, sns.color_palette("tab10", max(10, len(shown))).as_hex()))
    backbones = _backbone_order(table["backbone"])
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
            if len(rows) > 2 and rows[x].nunique() > 1 and rows[y].nunique() > 1:
                rho = spearmanr(rows[x], rows[y]).statistic
                ax.text(0.03, 0.95, f"ρ = {rho:+.2f}", transform=ax.transAxes, fontsize=7, va="top")
            ax.set_title(f"{backbone} · {title}", fontsize=8)
            if r == len(backbones) - 1:
                ax.set_xlabel(_label(x), fontsize=8)
            if c == 0:
                ax.set_ylabel("Δacc (uniform predictor)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
            parts.append(rows.assign(panel=title))
    fig.tight_layout()
    save_figure(fig, pd.concat(parts, ignore_index=True), name, out)
    return fig


def _mean_std(runs: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    grouped = runs.groupby(by, sort=True)[y]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"mean": f"{y}_mean", "std": f"{y}_std", "count": "runs"})


def _curves(runs: pd.DataFrame, xcol: str, y: str, xlabel: str, logx: bool, title: str,
            out: str | Path | None, name: str) -> plt.Figure:
    summary = _mean_std(runs, ["backbone", "probe", xcol], y)
    backbones = _backbone_order(summary["backbone"])
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
        if logx:
            ax.set_xscale("log")
        ax.set_title(backbone, fontsize=8, color=backbone_colours([backbone])[backbone])
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, lw=0.4, alpha=0.5)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(_label(y) + (" (mean ± std)" if summary["runs"].max() > 1 else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, summary, name, out)
    return fig


def layer_curves(runs: pd.DataFrame, y: str = "best_acc", out: str | Path | None = None,
                 name: str = "layer_curves") -> plt.Figure:
    """Accuracy per block: one panel per backbone, one line per probe (mean ± std over seeds).

    Args:
        runs: Rows of :func:`epviz.analysis.layer_sweep` (columns backbone, layer, probe, `y`).
        y: The accuracy column.
        out: Folder for ``<name>.png`` / ``.csv`` (the CSV holds the per-point mean, std, runs).
        name: File stem.
    """
    _require(runs, ["backbone", "layer", "probe", y], "layer_curves")
    return _curves(runs, "layer", y, "block (0 = first)", False, "Probes on the tokens of every block", out, name)


def low_shot_curves(runs: pd.DataFrame, y: str = "best_acc", out: str | Path | None = None,
                    name: str = "low_shot") -> plt.Figure:
    """Accuracy against labelled images per class (log axis), mean ± std over seeds.

    Args:
        runs: Rows of :func:`epviz.analysis.low_shot` (columns backbone, probe, shots, `y`).
        y: The accuracy column.
        out: Folder for ``<name>.png`` / ``.csv`` (the CSV holds the per-point mean, std, runs).
        name: File stem.
    """
    _require(runs, ["backbone", "probe", "shots", y], "low_shot_curves")
    return _curves(runs, "shots", y, "labelled images per class (log scale)", True, "Low-shot probing", out, name)


def _alpha_cmap(colour: str):
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    rgb = to_rgb(colour)
    return LinearSegmentedColormap.from_list(f"alpha-{colour}", [(*rgb, 0.0), (*rgb, 1.0)])


def query_group_gallery(images, maps: np.ndarray, labels, grid: tuple[int, int], boxes=None,
                        queries: list[int] | None = None, alpha: float = 0.85, title: str = "",
                        out: str | Path | None = None, name: str = "query_groups") -> plt.Figure:
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
        out: Folder for ``<name>.png`` / ``.csv`` (one row per image x map: kind, map, group, peak).
        name: File stem.
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
    columns = ["image", "all groups"] + [f"group {i} ({int((labels == i).sum())})" for i in range(g)] + [f"predictor {q}" for q in queries]
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
                ax.imshow(up_groups[i, c - 2], cmap=_alpha_cmap(colours[c - 2]), vmin=0, vmax=1 / alpha)
            elif c >= 2 + g:
                q = queries[c - 2 - g]
                ax.imshow(up_queries[i, c - 2 - g], cmap=_alpha_cmap(colours[labels[q]]), vmin=0, vmax=1 / alpha)
            if boxes is not None:
                draw_boxes(ax, boxes[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[c], fontsize=6.5, color=col_colours[c])
        for grp in range(g):
            records.append({"image": i, "kind": "group", "map": grp, "group": grp, "members": int((labels == grp).sum()),
                            "peak_token": int(grouped[i, grp].argmax()), "peak_weight": float(grouped[i, grp].max())})
        for q in range(k):
            records.append({"image": i, "kind": "predictor", "map": q, "group": int(labels[q]), "members": 1,
                            "peak_token": int(maps[i, q].argmax()), "peak_weight": float(maps[i, q].max())})
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame(records), name, out, dpi=110)
    return fig
