"""Where do trained probes put their attention mass? Lift on the object mask against order-keeping baselines.

For every backbone (last block; ``--train`` train canvases (seed 0), the standard val split, ``--test``
test canvases (seed 0)), one probe family (default EP16) trains as one
stack of learning rates x initialisation seeds (``epviz.training.fit_grid``); every seed keeps its own
learning rate (its best val top-1; nothing is chosen on test). On the test canvases it measures, per
seed: test top-1, mask lift at tokens and pixels, box lift, MaxBoxAccV2, pointing and entropy of

* ``trained``: the trained head;
* ``untrained``: the same head at its initialisation (the same seed);
* ``untrained, matched entropy``: those maps sharpened to the trained head's entropy (same order);
* ``pixel salience``: patch brightness sharpened to the trained head's entropy.

Paired differences (``epviz.analysis.paired_difference``: the test canvases drawn once for both arms,
seeds drawn per arm) compare each trained head with its baselines, and the backbones with each other.
MaxBoxAccV2 (``--threshold-step``, default 0.05: 20 thresholds) is measured for the trained and untrained
heads only, to be read as trained − untrained.

    python scripts/lift_check.py [--backbones tiny-mae tiny-sup tiny-random tiny-pixels] [--probe ep16]
                                 [--seeds 0 1 2] [--train 6000] [--test 1000] [--out docs/lift]

Writes ``<out>.csv`` (one row per backbone x condition x seed) and ``<out>_pairs.csv`` (one row per
comparison: estimate, interval, verdict). Each backbone's measurements are kept in the cache
(``$EPVIZ_CACHE/lift/``), so a run that adds a backbone trains only that one.

``--queries 1 2 4 8 16 32 64`` sweeps EP's number of queries M (the paper's M sweep): every M trains its own
stack and is compared with M = 16 on the same canvases. ``--salience 0 1 2`` measures every backbone on the canvases of each salience level
(``CanvasRecipe.salience``: brightness says less and less about where the item is; train, val and test
canvases all of that level) and adds, per level > 0, how much each backbone falls from level 0 and the
difference of those falls between backbones (paired over test canvases: canvas i shows the same item at
every level).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import Setting, extract_tokens, load_backbone  # noqa: E402
from epviz.analysis import LocalizationMeter, map_entropy, paired_difference  # noqa: E402
from epviz.analysis.baselines import patch_brightness, sharpen_maps  # noqa: E402
from epviz.atomic import atomic_write  # noqa: E402
from epviz.backbones.zoo import mae_run  # noqa: E402
from epviz.data import CanvasRecipe, ClutteredFashionMNIST  # noqa: E402
from epviz.evaluate import collect_attention, predict  # noqa: E402
from epviz.probes import build  # noqa: E402
from epviz.tokens.cache import default_cache_dir  # noqa: E402
from epviz.training import fit_grid  # noqa: E402
from epviz.viz.curves import sweep_curves  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIFTS = ("mask_lift", "mask_lift_px", "box_lift")


def sharpened(maps: np.ndarray, target: float) -> np.ndarray:
    """(n, K, N) maps sharpened to mean normalised entropy `target`, one temperature for all."""
    return sharpen_maps(maps.reshape(-1, maps.shape[-1]), target)[0].reshape(maps.shape)


def localise(maps: np.ndarray, test: ClutteredFashionMNIST, grid, thresholds) -> tuple[dict, dict]:
    """Means over predictors and images, and per-image values (means over predictors) of the lifts.

    MaxBoxAccV2 is the costly part (every map labelled at every threshold); a single threshold
    makes it nearly free where it is not reported.
    """
    meter = LocalizationMeter(maps.shape[1], grid, test.image_size, thresholds, records=True)
    for s in range(0, len(maps), 64):
        part = range(s, min(s + 64, len(maps)))
        meter.update(maps[s : part.stop], [test.box_list(i) for i in part], part, [test.mask(i).numpy() for i in part])
    rows, records = pd.DataFrame(meter.rows()), meter.image_records()
    summary = {c: float(rows[c].mean()) for c in (*LIFTS, "maxboxacc_v2", "pointing", "inbox_mass", "chance_mass")}
    summary["entropy_norm"] = float(map_entropy(maps).mean() / math.log(maps.shape[-1]))
    return summary, {c: records[c].mean(1) for c in LIFTS}


def measure_backbone(
    backbone, args: argparse.Namespace, setting: Setting, sets: tuple, options: dict
) -> tuple[list[dict], dict, dict]:
    """Rows, per-image lifts {(condition, seed): {column: (n,)}} and per-image correctness {seed: (n,)} of one backbone.

    `options`: build options of the probe (``num_queries``), the same for the trained and the untrained heads.
    """
    train_set, val_set, test = sets
    keys = ("epochs", "batch_size", "optimizer", "warmup_epochs", "label_smoothing", "early_stopping", "precision")
    budget = {k: v for k, v in setting.fit_options().items() if k in keys}
    name = backbone.name
    tr, va, te = (extract_tokens(backbone, ds, layers=[-1]).tokens(-1) for ds in (train_set, val_set, test))
    start = time.perf_counter()
    grid = fit_grid(args.probe, tr, va, lrs=args.lrs, seeds=args.seeds, keep_all=True, progress=False, **budget, **options)
    print(f"{name}: {len(grid.points)} heads trained as one stack in {time.perf_counter() - start:.0f} s", flush=True)
    points = grid.points.dropna(subset=["best_val_acc"])
    rows, per_image, correct = [], {}, {}
    thresholds = np.round(np.arange(0, 1, args.threshold_step), 6)
    bright = patch_brightness(test, te.grid) + 1e-6
    for seed in args.seeds:
        mine = points[points["seed"] == seed]
        best = mine.sort_values(["best_val_acc", "lr"], ascending=[False, True]).iloc[0]
        head = grid.probes[int(best["point"])]
        fresh = build(args.probe, tr.dim, 10, seed=seed, grid=tr.grid, **options)
        trained_maps = collect_attention(head, te).astype(np.float64)
        target = float(map_entropy(trained_maps).mean() / math.log(trained_maps.shape[-1]))
        untrained_maps = collect_attention(fresh, te).astype(np.float64)
        conditions = {
            "trained": trained_maps,
            "untrained": untrained_maps,
            "untrained, matched entropy": sharpened(untrained_maps, target),
            "pixel salience": sharpened((bright / bright.sum(-1, keepdims=True))[:, None], target),
        }
        out = predict(head, te)
        hits = out.logits.argmax(1) == out.labels
        correct[seed] = hits.astype(np.float64)
        for condition, maps in conditions.items():
            boxed = condition in ("trained", "untrained")  # MaxBoxAccV2 is reported as trained - untrained only
            summary, images = localise(maps, test, te.grid, thresholds if boxed else [0.5])
            if not boxed:
                summary.update(maxboxacc_v2=float("nan"), pointing=float("nan"))
            per_image[(condition, seed)] = images
            rows.append(
                {
                    "backbone": name,
                    "probe": args.probe,
                    "condition": condition,
                    "seed": seed,
                    "lr": float(best["lr"]),
                    "val_acc": float(best["best_val_acc"]),
                    "test_acc": float(hits.mean()),
                    **summary,
                }  # fmt: skip
            )
    return rows, per_image, correct


def stored(
    name: str, args: argparse.Namespace, setting: Setting, sets: tuple, level: int = 0, options: dict | None = None
) -> tuple[list[dict], dict, dict]:
    """:func:`measure_backbone`, kept under ``<cache>/lift/`` so that a later run adds backbones without retraining these."""
    config = [name, args.probe, args.seeds, args.lrs, args.train, args.test, args.threshold_step, setting.name]
    backbone = load_backbone(name)
    config.append(backbone.weights_id)
    config += [f"salience={level}"] if level else []
    config += [options] if options else []
    key = hashlib.sha256(json.dumps(config).encode()).hexdigest()[:16]
    path = default_cache_dir() / "lift" / f"{name}-{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        per_image = {(c, int(s)): {k: v.numpy() for k, v in d.items()} for (c, s), d in saved["per_image"]}
        return saved["rows"], per_image, {int(s): v.numpy() for s, v in saved["correct"]}
    rows, per_image, correct = measure_backbone(backbone, args, setting, sets, options or {})
    saved = {
        "rows": rows,
        "per_image": [((c, s), {k: torch.from_numpy(v) for k, v in d.items()}) for (c, s), d in per_image.items()],
        "correct": [(s, torch.from_numpy(v)) for s, v in correct.items()],
    }
    atomic_write(path, lambda tmp: torch.save(saved, tmp))
    return rows, per_image, correct


def run(args: argparse.Namespace, setting: Setting) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every arm (salience level x backbone x number of queries): its rows, then the paired comparisons."""
    rows, per_image, correct = [], {}, {}
    for level in args.salience:
        recipe = CanvasRecipe.salience(level)
        sets = (
            ClutteredFashionMNIST("train", args.train, seed=0, recipe=recipe),
            ClutteredFashionMNIST("train", int(setting.sizes["val"] or 2_000), seed=1, recipe=recipe),
            ClutteredFashionMNIST("test", args.test, seed=0, recipe=recipe),
        )
        for name in args.backbones:
            for m in args.queries or [None]:
                start = time.perf_counter()
                options = {} if m is None else {"num_queries": m}
                mine, images, hits = stored(name, args, setting, sets, level, options)
                rows += [dict(row, salience=level, queries=m) for row in mine]
                per_image.update({(name, c, s, level, m): v for (c, s), v in images.items()})
                correct.update({(name, s, level, m): v for s, v in hits.items()})
                print(f"{name} (salience {level}, queries {m or 'default'}): {time.perf_counter() - start:.0f} s", flush=True)
    return pd.DataFrame(rows), pairs(args, per_image, correct)


def pairs(args: argparse.Namespace, per_image: dict, correct: dict) -> pd.DataFrame:
    """Paired differences: trained against each baseline in every arm, backbone against backbone, (with several
    salience levels) each backbone's fall from level 0 and the difference of the falls, and (with ``--queries``)
    every number of queries against the reference one (16, else the largest)."""
    queries = args.queries or [None]

    def arm(name: str, condition: str, column: str, level: int, m=None) -> np.ndarray:
        return np.stack([per_image[(name, condition, s, level, m)][column] for s in args.seeds])

    def hits(name: str, level: int, m=None) -> np.ndarray:
        return np.stack([correct[(name, s, level, m)] for s in args.seeds])

    def row(a: str, b: str, measure: str, level, d, m=None) -> dict:
        return {"salience": level, "queries": m, "a": a, "b": b, "measure": measure, **d._asdict(), "verdict": d.verdict}

    rows = []
    for level in args.salience:
        for m in queries:
            for name in args.backbones:
                for baseline in ("untrained", "untrained, matched entropy", "pixel salience"):
                    for column in LIFTS:
                        d = paired_difference(arm(name, "trained", column, level, m), arm(name, baseline, column, level, m))
                        rows.append(row(f"{name} trained", f"{name} {baseline}", column, level, d, m))
            for first, second in combinations(args.backbones, 2):
                for column in LIFTS:
                    d = paired_difference(arm(first, "trained", column, level, m), arm(second, "trained", column, level, m))
                    rows.append(row(f"{first} trained", f"{second} trained", column, level, d, m))
                d = paired_difference(hits(first, level, m), hits(second, level, m))
                rows.append(row(f"{first} trained", f"{second} trained", "test_acc", level, d, m))
        if args.queries:
            reference = 16 if 16 in args.queries else max(args.queries)
            for name in args.backbones:
                for m in [q for q in args.queries if q != reference]:
                    d = paired_difference(hits(name, level, m), hits(name, level, reference))
                    rows.append(row(f"{name} M={m}", f"{name} M={reference}", "test_acc", level, d, m))
                    d = paired_difference(
                        arm(name, "trained", "mask_lift", level, m), arm(name, "trained", "mask_lift", level, reference)
                    )
                    rows.append(row(f"{name} M={m}", f"{name} M={reference}", "mask_lift", level, d, m))
    for level in [lv for lv in args.salience if lv]:
        # a fall: level-0 minus level-L values of the same canvas, seed s of one level against seed s of the other
        falls = {
            name: {
                "test_acc": hits(name, 0) - hits(name, level),
                "mask_lift": arm(name, "trained", "mask_lift", 0) - arm(name, "trained", "mask_lift", level),
            }
            for name in args.backbones
        }
        for name in args.backbones:
            for measure, fall in falls[name].items():
                d = paired_difference(fall, np.zeros_like(fall))
                rows.append(row(f"{name} fall 0->{level}", "no fall", measure, level, d))
        for first, second in combinations(args.backbones, 2):
            for measure in ("test_acc", "mask_lift"):
                d = paired_difference(falls[first][measure], falls[second][measure])
                rows.append(row(f"{first} fall 0->{level}", f"{second} fall 0->{level}", measure, level, d))
    return pd.DataFrame(rows).drop(columns=["seeds"]).assign(seeds=len(args.seeds))


def draw(table: pd.DataFrame, out: Path) -> None:
    """``<out>_pretraining.png`` (top-1 and lift of the trained heads along the zoo's MAE run, the other backbones
    beside it) when the table holds two or more of that run's checkpoints; ``<out>_sweep.png`` with a query sweep."""
    trained = table[(table["condition"] == "trained") & (table["salience"] == 0)]
    measures = {"test_acc": "test top-1", "mask_lift": "lift on the item mask"}
    along = trained[trained["queries"].isna()].assign(epoch=lambda t: t["backbone"].map(mae_run()))
    along["run"] = along["backbone"].where(along["epoch"].isna(), "tiny-mae@epoch (one MAE run)")
    if along["epoch"].nunique() >= 2:
        sweep_curves(along, "epoch", measures, "MAE epochs of the run (0 = tiny-random)",
                     line="run", out=out.parent, name=f"{out.name}_pretraining")  # fmt: skip
    swept = trained.dropna(subset=["queries"])
    if swept["queries"].nunique() >= 2:
        sweep_curves(swept, "queries", measures, "queries M (log scale)", logx=True, out=out.parent, name=f"{out.name}_sweep")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["tiny-mae", "tiny-sup", "tiny-random", "tiny-pixels"])
    parser.add_argument("--probe", default="ep16")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-2, 3e-2, 1e-1])
    parser.add_argument("--train", type=int, default=6000, help="train canvases")
    parser.add_argument("--test", type=int, default=1000, help="test canvases measured")
    parser.add_argument("--threshold-step", type=float, default=0.05, help="MaxBoxAccV2 thresholds 0, step, ... < 1")
    parser.add_argument("--queries", nargs="+", type=int, default=None, help="numbers of queries M to sweep (EP's num_queries)")
    parser.add_argument("--salience", nargs="+", type=int, default=[0], help="canvas salience levels (0: the standard canvases)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "lift")
    parser.add_argument("--fast", action="store_true", help="the fast setting's budget and thresholds (a pipeline check)")
    args = parser.parse_args(argv)
    table, comparisons = run(args, Setting.fast() if args.fast else Setting.full())
    atomic_write(args.out.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(args.out.with_name(args.out.name + "_pairs.csv"), lambda tmp: comparisons.to_csv(tmp, index=False))
    draw(table, args.out)
    means = table.groupby(["salience", "backbone", "queries", "condition"], sort=False, dropna=False)[
        ["test_acc", "mask_lift", "maxboxacc_v2", "entropy_norm"]
    ]
    print(means.agg(["mean", "std"]).round(3).to_string())
    print(comparisons.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
