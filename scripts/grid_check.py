"""Is the standard grid's choice of learning rate trustworthy? Two checks, on val only.

1. **Subset against full size** (``docs/grid_subset.csv``). The full setting trains each probe's grid
   on a class-balanced subset of the training canvases (``grid["train_size"]``), picks the point on
   val, and refits that point on all of them. Here the same grid is also trained on the whole
   training set, side by side, for every (backbone, probe) of ``--backbones`` x ``--probes``:
   ``lr_subset`` and ``lr_full`` are the two choices; ``regret`` is the full-size val top-1 of the full
   grid's choice minus that at the subset's choice (0 when both choose the same point). A decision
   changes when the regret exceeds the val noise (``val_se``, the binomial standard error).
2. **Edges** (``docs/grid_edges.csv``, with ``--edges-from``). A run whose choice is the grid's
   largest (smallest) learning rate may want a larger (smaller) one. For every such run of a full
   ``make figures``, the grid is extended by two points beyond that edge (x3 and x10, or /3 and /10)
   and trained on the same subset with the same seed: ``gain`` is the best val top-1 beyond the edge
   minus the val top-1 at the edge. ``--edges-from`` takes the run's ``figures/01_grid_points.csv``
   (every grid point) or a results table (``docs/results.csv``: its tuned rows, read against the
   standard grid's ends), so the published run can be checked without running it again.

The test split is never read. Writes the CSVs under ``--out`` (default ``docs/``).

    python scripts/grid_check.py [--backbones tiny-mae tiny-random] [--probes cls gap ep16]
                                 [--edges-from figures/01_grid_points.csv | docs/results.csv] [--fast]
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

ROOT = Path(__file__).resolve().parents[1]


def grid_points(kind: str, train, val, lrs, weight_decays, budget: dict, seed: int) -> pd.DataFrame:
    """The grid's points table (one row per lr x weight decay) trained on `train`, selected on `val`."""
    options = {k: v for k, v in budget.items() if k not in ("lr", "weight_decay")}
    result = fit_grid(kind, train, val, lrs=lrs, weight_decays=weight_decays, seed=seed, progress=False, **options)
    return result.points.assign(chosen=lambda p: p["point"] == result.best["point"], seconds=result.seconds)


def by_lr(points: pd.DataFrame) -> str:
    return " ".join(f"{lr:g}:{a:.3f}" for lr, a in points.sort_values("lr")[["lr", "best_val_acc"]].to_numpy())


def subset_check(study, backbones, probes, grid: dict, budget: dict, seed: int) -> pd.DataFrame:
    rows = []
    for name in backbones:
        train, val = study.tokens[name]["train"], study.tokens[name]["val"]
        subset = train.subset(balanced_subset(train.labels, grid["train_size"], seed))
        for kind in probes:
            start = time.perf_counter()
            on_subset = grid_points(kind, subset, val, grid["lrs"], grid["weight_decays"], budget, seed)
            on_full = grid_points(kind, train, val, grid["lrs"], grid["weight_decays"], budget, seed)
            pick_subset = on_subset.loc[on_subset["chosen"]].iloc[0]
            pick_full = on_full.loc[on_full["chosen"]].iloc[0]
            at_subset_pick = float(on_full.loc[on_full["point"] == pick_subset["point"], "best_val_acc"].iloc[0])
            acc = float(pick_full["best_val_acc"])
            row = {
                "backbone": name,
                "probe": kind,
                "train_subset": len(subset),
                "train_full": len(train),
                "val": len(val),
                "lr_subset": float(pick_subset["lr"]),
                "lr_full": float(pick_full["lr"]),
                "val_acc_full_at_full_choice": acc,
                "val_acc_full_at_subset_choice": at_subset_pick,
                "regret": acc - at_subset_pick,
                "val_se": float(np.sqrt(acc * (1 - acc) / len(val))),
                "val_acc_full_by_lr": by_lr(on_full),
                "val_acc_subset_by_lr": by_lr(on_subset),
                "seconds": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            print(
                f"subset  {name:12s} {kind:8s} lr subset {row['lr_subset']:g} full {row['lr_full']:g}  "
                f"regret {row['regret']:+.4f} (val se {row['val_se']:.4f})  {row['seconds']:.0f} s",
                flush=True,
            )
    return pd.DataFrame(rows)


def edge_runs(table: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """The runs whose chosen learning rate is an end of their grid, with ``upper`` (the largest end).

    Args:
        table: A grid-points table (``chosen``, ``edge``, one row per point) or a results table
            (``tuned`` rows, read against ``grid["lrs"]``; their grid val top-1 is not in it: NaN).
        grid: The standard grid.
    """
    if {"chosen", "edge"} <= set(table.columns):
        keys = ["backbone", "probe", "seed"]
        ends = table.groupby(keys)["lr"].agg(["min", "max"]).reset_index()
        runs = table[table["chosen"] & table["edge"]].merge(ends, on=keys)
        return runs.assign(upper=runs["lr"] == runs["max"])
    if not {"tuned", "lr", "backbone", "probe", "seed"} <= set(table.columns):
        raise SystemExit("--edges-from needs a grid-points table (chosen, edge) or a results table (tuned, lr)")
    runs = table[table["tuned"].astype(bool) & table["lr"].isin([min(grid["lrs"]), max(grid["lrs"])])]
    return runs.assign(upper=runs["lr"] == max(grid["lrs"]), best_val_acc=np.nan).drop_duplicates(["backbone", "probe", "seed"])


def edge_check(study, runs: pd.DataFrame, grid: dict, budget: dict) -> pd.DataFrame:
    rows = []
    for run in runs.itertuples():
        if run.backbone not in study.tokens:
            continue
        upper = bool(run.upper)
        beyond = (run.lr * 3, run.lr * 10) if upper else (run.lr / 10, run.lr / 3)
        train, val = study.tokens[run.backbone]["train"], study.tokens[run.backbone]["val"]
        subset = train.subset(balanced_subset(train.labels, grid["train_size"], int(run.seed)))
        start = time.perf_counter()
        extended = grid_points(run.probe, subset, val, (run.lr, *beyond), (run.weight_decay,), budget, int(run.seed))
        at_edge = float(extended.loc[extended["lr"] == run.lr, "best_val_acc"].iloc[0])
        best_beyond = float(extended.loc[extended["lr"] != run.lr, "best_val_acc"].max())
        row = {
            "backbone": run.backbone,
            "probe": run.probe,
            "seed": int(run.seed),
            "edge": "largest" if upper else "smallest",
            "lr_edge": float(run.lr),
            "val_acc_at_edge": at_edge,
            "val_acc_at_edge_in_run": float(run.best_val_acc),
            "best_val_acc_beyond": best_beyond,
            "gain": best_beyond - at_edge,
            "val_se": float(np.sqrt(at_edge * (1 - at_edge) / len(val))),
            "val_acc_by_lr": by_lr(extended),
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(
            f"edge    {run.backbone:12s} {run.probe:8s} {row['edge']} lr {run.lr:g}: val {at_edge:.3f}, "
            f"beyond {best_beyond:.3f} (gain {row['gain']:+.3f}, se {row['val_se']:.3f})",
            flush=True,
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny-mae", "tiny-random"])
    parser.add_argument("--probes", nargs="+", default=["cls", "gap", "ep16"], help="probes of the subset check (none: skip it)")
    parser.add_argument(
        "--edges-from", type=Path, default=None, help="a full run's 01_grid_points.csv or a results.csv: run the edge check"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="the fast setting's sizes and budget (a smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)

    setting = Setting.fast() if args.fast else Setting.full()
    grid = dict(setting.grid if setting.grid is not None else Setting.full().grid)
    grid["train_size"] = grid.get("train_size") or Setting.full().grid["train_size"]
    budget = dict(setting.budget)
    runs = edge_runs(pd.read_csv(args.edges_from), grid) if args.edges_from is not None else None
    backbones = list(dict.fromkeys([*args.backbones, *([] if runs is None else runs["backbone"].unique())]))
    study = open_study(backbones, control=None, setting=setting, figures="/tmp/epviz-grid-check")
    if args.probes:
        table = subset_check(study, args.backbones, args.probes, grid, budget, args.seed)
        atomic_write(args.out / "grid_subset.csv", lambda tmp: table.to_csv(tmp, index=False))
        changed = table[table["lr_subset"] != table["lr_full"]]
        print(f"subset: {len(changed)} of {len(table)} choices differ; largest regret {table['regret'].max():.4f}")
    if runs is not None:
        edges = edge_check(study, runs, grid, budget)
        atomic_write(args.out / "grid_edges.csv", lambda tmp: edges.to_csv(tmp, index=False))
        if len(edges):
            better = edges[edges["gain"] > edges["val_se"]]
            print(f"edges: {len(edges)} runs chose an end of the grid; {len(better)} gain more than the val se beyond it")


if __name__ == "__main__":
    main()
