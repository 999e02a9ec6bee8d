"""Does selecting the learning rate on a 4,000-canvas subset change any decision?

The full setting trains each probe's grid of learning rates on a class-balanced subset of the
training canvases (``grid["train_size"]``), picks the point on val, and refits that point on all of
them. This script trains the same grid on the whole training set too, side by side, and reports for
every (backbone, probe):

- the learning rate each grid chooses on val (``lr_subset``, ``lr_full``);
- ``regret``: the full-size val top-1 of the full grid's choice minus the full-size val top-1 at the
  subset's choice (0 when both choose the same point). A decision changes when the regret is larger
  than the val noise (``val_se``: the binomial standard error of a val accuracy).

Only val is read; the test split is not touched. Writes ``docs/subset_selection.csv``.

    python scripts/subset_selection.py [--backbones tiny-mae tiny-random] [--probes cls ep16 mhca] [--fast]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import Setting, open_study  # noqa: E402
from epviz.atomic import atomic_write  # noqa: E402
from epviz.data.splits import balanced_subset  # noqa: E402
from epviz.training import fit_grid  # noqa: E402


def grid_points(kind: str, train, val, grid: dict, budget: dict, seed: int) -> pd.DataFrame:
    """The grid's points table (one row per lr x weight decay) trained on `train`, selected on `val`."""
    options = {k: v for k, v in budget.items() if k not in ("lr", "weight_decay")}
    result = fit_grid(
        kind, train, val, lrs=grid["lrs"], weight_decays=grid["weight_decays"], seed=seed, progress=False, **options
    )
    points = result.points.assign(chosen=lambda p: p["point"] == result.best["point"], seconds=result.seconds)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny-mae", "tiny-random"])
    parser.add_argument("--probes", nargs="+", default=["cls", "ep16", "mhca"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="the fast setting's sizes and budget (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "subset_selection.csv")
    args = parser.parse_args()

    setting = Setting.fast() if args.fast else Setting.full()
    grid = dict(setting.grid if setting.grid is not None else Setting.full().grid)
    grid["train_size"] = grid.get("train_size") or Setting.full().grid["train_size"]
    budget = dict(setting.budget)
    study = open_study(args.backbones, control=None, setting=setting, figures="/tmp/epviz-subset-selection")
    rows = []
    for name in args.backbones:
        train, val = study.tokens[name]["train"], study.tokens[name]["val"]
        subset = train.subset(balanced_subset(train.labels, grid["train_size"], args.seed))
        for kind in args.probes:
            start = time.perf_counter()
            on_subset = grid_points(kind, subset, val, grid, budget, args.seed)
            on_full = grid_points(kind, train, val, grid, budget, args.seed)
            pick_subset = on_subset.loc[on_subset["chosen"]].iloc[0]
            pick_full = on_full.loc[on_full["chosen"]].iloc[0]
            at_subset_pick = on_full.loc[on_full["point"] == pick_subset["point"], "best_val_acc"].iloc[0]
            acc = float(pick_full["best_val_acc"])
            row = {
                "backbone": name,
                "probe": kind,
                "train_subset": len(subset),
                "train_full": len(train),
                "val": len(val),
                "lrs": " ".join(f"{lr:g}" for lr in grid["lrs"]),
                "lr_subset": float(pick_subset["lr"]),
                "lr_full": float(pick_full["lr"]),
                "val_acc_full_at_full_choice": acc,
                "val_acc_full_at_subset_choice": float(at_subset_pick),
                "regret": acc - float(at_subset_pick),
                "val_se": float(np.sqrt(acc * (1 - acc) / len(val))),
                "val_acc_full_by_lr": " ".join(f"{a:.3f}" for a in on_full.sort_values("lr")["best_val_acc"]),
                "val_acc_subset_by_lr": " ".join(f"{a:.3f}" for a in on_subset.sort_values("lr")["best_val_acc"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            print(
                f"{name:12s} {kind:6s} lr subset {row['lr_subset']:g} full {row['lr_full']:g}  "
                f"regret {row['regret']:+.4f} (val se {row['val_se']:.4f})  {row['seconds']:.0f} s",
                flush=True,
            )
    table = pd.DataFrame(rows)
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    changed = table[table["lr_subset"] != table["lr_full"]]
    print(f"{len(changed)} of {len(table)} choices differ; largest regret {table['regret'].max():.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
