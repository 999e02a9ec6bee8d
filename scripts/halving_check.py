"""Would successive halving have picked what the full grid picked? Replayed on the grids in the probe cache.

Halving changes no head's training (each head of a stack trains alone; tests/training/test_engine.py checks
it), only which heads stop early, so what ``fit_grid(..., halving=eta)`` would pick follows from a full grid's
validation curves: at each rung of :func:`epviz.training.engine.halving_rungs` keep
:func:`~epviz.training.engine.halving_keep` of the heads still training (best val top-1 so far), then pick
among the survivors with :func:`~epviz.training.grid.select_point`. This script does that for every tuned
entry of the probe cache (the grids of notebook 01 and the layer sweep after ``make figures``) and reports
how often the pick is the same point, the val top-1 given up when it is not, and the head-epochs saved.
A same pick means the same refit, so the same test top-1.

    python scripts/halving_check.py --min-train 4000 --out docs/halving_check.csv
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz.atomic import atomic_write  # noqa: E402
from epviz.errors import DataError  # noqa: E402
from epviz.safe_load import read_json  # noqa: E402
from epviz.training.engine import halving_keep, halving_rungs  # noqa: E402
from epviz.training.grid import select_point  # noqa: E402
from epviz.training.probe_cache import probe_cache_dir  # noqa: E402


def replay(grid: dict, epochs: int, eta: int) -> dict:
    """The halving pick of one full grid and its cost, from the grid's points and curves."""
    points = pd.DataFrame(grid["points"])
    history = pd.DataFrame(grid["history"])
    alive = set(points["point"])
    stopped: dict[int, int] = {}
    for rung in halving_rungs(epochs, eta, len(points)):
        upto = history[(history["epoch"] <= rung) & history["point"].isin(alive)]
        best = upto.groupby("point")["val_acc"].max().reindex(sorted(alive))
        kept = halving_keep({int(p): (-math.inf if pd.isna(a) else float(a)) for p, a in best.items()}, eta)
        stopped.update(dict.fromkeys(alive - kept, rung))
        alive = kept
    pick = select_point(points[points["point"].isin(alive)])
    full = points.set_index("point").loc[grid["chosen"]["point"]]
    run = points.set_index("point")["epochs_run"]
    return dict(
        heads=len(points),
        eta=eta,
        full_lr=float(full["lr"]),
        halving_lr=float(pick["lr"]),
        same_pick=int(pick["point"]) == int(grid["chosen"]["point"]),
        val_given_up=float(full["best_val_acc"]) - float(pick["best_val_acc"]),
        head_epochs_full=int(run.sum()),
        head_epochs_halving=int(sum(min(int(run[p]), stopped.get(p, epochs)) for p in run.index)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="the probe cache (default: epviz's)")
    parser.add_argument("--min-train", type=int, default=4000, help="only grids trained on at least this many samples")
    parser.add_argument("--etas", default="2,3", help="comma-separated halving factors")
    parser.add_argument("--out", default=None, help="write the table to this CSV")
    args = parser.parse_args()
    folder = Path(args.cache or probe_cache_dir())
    rows = []
    for meta in sorted(folder.glob("*.json")):
        entry = read_json(meta, what="a probe-cache entry", fix="Delete it and train that run again.", error=DataError)
        fit = entry.get("fit") or {}
        grid = fit.get("grid")
        if not grid or int(grid.get("train_size") or fit.get("train_size") or 0) < args.min_train or len(grid["points"]) < 2:
            continue
        origin = fit.get("train_origin") or {}
        for eta in (int(e) for e in args.etas.split(",")):
            rows.append(
                dict(
                    entry=meta.stem,
                    backbone=origin.get("backbone"),
                    probe=fit["probe"]["name"],
                    **replay(grid, int(fit["epochs"]), eta),
                )
            )
    if not rows:
        sys.exit(f"no tuned grid trained on >= {args.min_train} samples in {folder}: run `make figures` first")
    table = pd.DataFrame(rows)
    summary = table.groupby("eta").agg(
        grids=("same_pick", "size"),
        same_pick=("same_pick", "mean"),
        max_val_given_up=("val_given_up", "max"),
        head_epochs=("head_epochs_halving", "sum"),
        head_epochs_full=("head_epochs_full", "sum"),
    )
    summary["compute"] = summary["head_epochs"] / summary["head_epochs_full"]
    print(summary.to_string())
    if args.out:
        atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
