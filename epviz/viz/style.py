"""The look shared by every figure: backbone colours, axis labels, and saving a figure with its data.

Each figure function of :mod:`epviz.viz` returns a matplotlib Figure and, given `out`, saves
``<out>/<name>.png``, the CSV of the data behind it and a provenance sidecar ``<name>.json``,
atomically (:func:`save_figure`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from epviz.analysis.meters import column_label
from epviz.atomic import atomic_write
from epviz.provenance import sidecar, write_sidecar

__all__ = [
    "BACKBONE_PALETTE",
    "METRIC_LABELS",
    "axis_label",
    "backbone_colours",
    "backbone_order",
    "chance_level",
    "draw_chance",
    "register_label",
    "require_columns",
    "save_figure",
    "shown_images",
]

BACKBONE_PALETTE = {"tiny-mae": "#1f77b4", "tiny-sup": "#ff7f0e", "tiny-random": "#7f7f7f"}
METRIC_LABELS = {  # the per-predictor measures' labels come with their meters (epviz.analysis.meters)
    "params": "trainable parameters",
    "gflops": "probe GFLOPs per image",
    "total_gflops": "backbone + probe GFLOPs per image",
    "test_acc": "top-1 accuracy (test)",
    "val_acc": "top-1 accuracy (val)",
    "best_acc": "top-1 accuracy (val, best epoch)",
    "final_acc": "top-1 accuracy (val, last epoch)",
}


def register_label(column: str, label: str) -> None:
    """Give a result column its axis label (it takes precedence over a meter's label)."""
    METRIC_LABELS[str(column)] = str(label)


def axis_label(column: str) -> str:
    """The axis label of a result column: its registered label, else its meter's label, else its name."""
    if column in METRIC_LABELS:
        return METRIC_LABELS[column]
    return column_label(column) or column.replace("_", " ")


def require_columns(data: pd.DataFrame, columns: list[str], what: str) -> None:
    """Raise a ValueError naming the missing columns, or an empty table."""
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


def backbone_order(names) -> list[str]:
    """Backbone names in display order: the zoo's first, then the others as they come."""
    present = list(dict.fromkeys(names))
    return [b for b in BACKBONE_PALETTE if b in present] + [b for b in present if b not in BACKBONE_PALETTE]


def chance_level(results: pd.DataFrame, chance: float | None = None) -> float | None:
    """The top-1 accuracy of guessing, 1 / classes: `chance` when given, else from a ``num_classes`` column.

    Raises:
        ValueError: The rows disagree on the number of classes.
    """
    if chance is not None:
        return float(chance)
    if "num_classes" not in results.columns:
        return None
    classes = pd.to_numeric(results["num_classes"], errors="coerce").dropna().unique()
    if len(classes) > 1:
        raise ValueError(f"the rows have different numbers of classes {sorted(classes)}: pass chance= explicitly")
    return 1.0 / float(classes[0]) if len(classes) else None


def draw_chance(ax, chance: float | None) -> None:
    """A horizontal line at the chance accuracy, labelled for the legend; nothing when None."""
    if chance is not None:
        ax.axhline(chance, color="k", lw=0.8, ls=":", zorder=1, label=f"chance (1/classes = {chance:.3g})")


def shown_images(positions: Iterable[int], index: Iterable[int] | None = None, dataset: Any = None) -> dict[str, Any]:
    """The provenance entries of a figure that shows images: which images, of which dataset.

    Args:
        positions: Positions of the shown images in the arrays the figure was given.
        index: Their positions in the dataset, when the caller passed them (then they are recorded).
        dataset: The dataset they come from (its ``fingerprint()`` is recorded), or None.

    Raises:
        ValueError: `index` does not give one position per shown image.
    """
    positions = [int(i) for i in positions]
    out: dict[str, Any] = {}
    if index is None:
        out["images"], out["images_are"] = (
            positions,
            "positions in the images passed to the figure (pass index= for dataset positions)",
        )
    else:
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        if len(index) != len(positions):
            raise ValueError(f"index gives {len(index)} dataset positions for {len(positions)} images shown: give one per image")
        out["images"], out["images_are"] = index, "dataset positions"
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        out["dataset"] = fingerprint()
        out["images_are"] = "dataset positions"
    return out


def save_figure(
    fig: plt.Figure,
    data: pd.DataFrame | None,
    name: str,
    out: str | Path | None,
    dpi: int = 150,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Save `fig` as ``<out>/<name>.png``, `data` as ``<out>/<name>.csv`` and their provenance as ``<out>/<name>.json``.

    Nothing is written when `out` is None. Every file is written atomically, the sidecar last.

    Args:
        fig: The figure.
        data: The table behind it (None: no CSV).
        name: File stem.
        out: Folder.
        dpi: Resolution of the PNG.
        provenance: What the caller knows of the figure's origin (``seeds``, ``dataset``,
            ``token_caches``, ``probe_caches``, ``images``: the exact images shown, ...); the commit,
            the package versions and what this process noted are added (see :func:`epviz.provenance.sidecar`).

    Returns:
        The paths written, by kind: ``png``, ``csv`` (with `data`) and ``json``.
    """
    if out is None:
        return {}
    out = Path(out)
    written = {"png": out / f"{name}.png"}
    atomic_write(written["png"], lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if data is not None:
        written["csv"] = out / f"{name}.csv"
        atomic_write(written["csv"], lambda tmp: data.to_csv(tmp, index=False))
    doc = sidecar(name, files=written, data=data, provenance=provenance)
    written["json"] = write_sidecar(out / f"{name}.json", doc)
    return written
