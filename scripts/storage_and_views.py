"""What the storage choices cost in accuracy: int8 against float16 tokens, and K stored views against none.

1. **int8** (the zoo: tiny-mae, tiny-sup and the random-init control tiny-random; the notebooks' full
   sizes: 20,000 train, 2,000 val, 4,000 test canvases; last block): LP, EP16 and MHCA trained with
   the standard setting's tuning budget (a grid of learning rates, selected on val) on the
   notebooks' float16 caches and on int8 caches of the same images.
2. **views** (tiny-mae, tiny-sup and the control tiny-random, a smaller training set, ``--views-train`` canvases, because the
   per-step protocol runs the backbone at every step): the same probes on float16 tokens of the
   un-augmented images (``cached``), on ``--views`` stored RandomResizedCrop + flip views per image
   with one drawn per image per epoch (``views4``), and, for LP and EP16 on tiny-mae, under the
   per-step protocol (``fit_images``: a fresh crop at every step) at the learning rate the cached
   grid chose (one run each: too slow on 2 CPU cores for a grid). Val and test tokens are the
   un-augmented ones.

Top-1 on the 4,000 test canvases with a 95% bootstrap interval, and the paired difference to the
float16 / cached run of the same probe (the same test images) with its interval. Writes
``docs/storage_and_views.csv``.

    python scripts/storage_and_views.py [--views 4] [--views-train 5000] [--parts int8 views] [--lrs ...] [--fast]

The table in docs/storage_and_views.csv was measured with the grid lrs 1e-3 3e-3 1e-2 3e-2 (the standard
grid then); ``--lrs`` reruns it so, and ``--parts`` replaces only those experiments' rows in ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import Setting, open_study  # noqa: E402
from epviz.analysis.intervals import bootstrap_mean  # noqa: E402
from epviz.atomic import atomic_write  # noqa: E402
from epviz.backbones import load_backbone  # noqa: E402
from epviz.data import load_split  # noqa: E402
from epviz.evaluate import predict  # noqa: E402
from epviz.probes import build  # noqa: E402
from epviz.tokens import extract_tokens  # noqa: E402
from epviz.training import fit_images, probe_zoo  # noqa: E402

BACKBONES = ("tiny-mae", "tiny-sup", "tiny-random")
PROBES = ("cls", "ep16", "mhca")
VIEW_BACKBONES = ("tiny-mae", "tiny-sup", "tiny-random")


def correct(probe, tokens) -> np.ndarray:
    """Per test image: 1 when the probe's top-1 is right."""
    out = predict(probe, tokens)
    return (np.asarray(out.logits).argmax(1) == tokens.labels).astype(np.float64)


def as_files(dataset, folder: Path) -> None:
    """Write a canvas dataset as class folders of lossless PNGs (``folder/<class>/<index>.png``)."""
    from PIL import Image

    images = dataset.image_batch(slice(None))
    pixels = (images.clamp(0, 1) * 255).round().byte() if images.dtype != torch.uint8 else images
    for i, (image, label) in enumerate(zip(pixels, np.asarray(dataset.labels))):
        target = folder / f"{int(label):02d}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(target / f"{i:06d}.png")


def store_tokens(backbones, sets, dtype: str, views: int) -> dict[str, dict]:
    """The last block's tokens per backbone: `dtype` (train with `views` views), val and test un-augmented."""
    out = {}
    for name in backbones:
        bb = load_backbone(name)
        out[name] = {
            split: extract_tokens(bb, data, [-1], dtype=dtype, views=views if split == "train" else 1).tokens(-1, in_memory=True)
            for split, data in sets.items()
        }
    return out


def compare(stores: dict[str, dict], probes, budget, rows: list[dict], experiment: str) -> dict:
    """Tuned runs of `probes` on every store; rows against the first store's runs. Returns the first's hits."""
    reference = {}
    for store, tokens in stores.items():
        start = time.perf_counter()
        runs, fitted = probe_zoo(tokens, list(probes), budget=budget, progress=True)
        print(f"{experiment} / {store}: {len(runs)} tuned runs in {time.perf_counter() - start:.0f} s", flush=True)
        for run in runs.itertuples():
            hits = correct(fitted[run.backbone, run.probe], tokens[run.backbone]["test"])
            reference.setdefault((run.backbone, run.probe), hits)
            rows.append(
                _row(experiment, run.backbone, run.probe, store, run.lr, run.val_acc, hits, reference[run.backbone, run.probe])
            )
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--views-train", type=int, default=5000, help="training canvases of the views experiment")
    parser.add_argument("--parts", nargs="+", default=["int8", "views"], choices=["int8", "views"])
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="the grid's learning rates (default: the setting's)")
    parser.add_argument("--fast", action="store_true", help="the fast setting (a check of the script, not a measurement)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "storage_and_views.csv"))
    args = parser.parse_args()
    setting = Setting.fast() if args.fast else Setting.full()
    if args.lrs:
        setting = setting.replace(grid={"lrs": tuple(args.lrs)}, name=setting.name)
    budget = setting.fit_options()
    rows: list[dict] = []
    if "int8" in args.parts:
        study = open_study(BACKBONES, setting=setting, figures="/tmp/epviz-storage-figures")
        int8 = store_tokens(study.backbones, study.sets, "int8", 1)
        compare({"float16": study.tokens, "int8": int8}, PROBES, budget, rows, "int8")
    if "views" in args.parts:
        small = setting.replace(sizes={"train": min(args.views_train, setting.sizes["train"] or args.views_train)})
        study = open_study(VIEW_BACKBONES, control=None, setting=small, figures="/tmp/epviz-storage-figures", tokens=False)
        cached = store_tokens(study.backbones, study.sets, "float16", 1)
        viewed = store_tokens(study.backbones, study.sets, "float16", args.views)
        reference = compare({"cached": cached, f"views{args.views}": viewed}, PROBES, budget, rows, "views")
        chosen = {(r["backbone"], r["probe"]): r["lr"] for r in rows if r["experiment"] == "views" and r["store"] == "cached"}
        bb = load_backbone("tiny-mae")
        test = cached["tiny-mae"]["test"]
        options = {k: v for k, v in budget.items() if k not in ("grid", "lr", "weight_decay")}
        with tempfile.TemporaryDirectory() as tmp:  # the per-step protocol augments image files: the same canvases as PNGs
            for split in ("train", "val"):
                as_files(study.sets[split], Path(tmp) / split)
            files = {split: load_split(f"imagefolder:{tmp}", split) for split in ("train", "val")}
            for probe_name in ("ep16", "cls"):
                probe = build(probe_name, bb.dim, test.num_classes, seed=0)
                lr = chosen["tiny-mae", probe_name]
                result = fit_images(probe, bb, files["train"], files["val"], lr=lr, weight_decay=1e-4, progress=True, **options)
                hits = correct(result.probe, test)
                rows.append(
                    _row(
                        "views", "tiny-mae", probe_name, "per-step", lr, result.best_acc, hits, reference["tiny-mae", probe_name]
                    )
                )
                print(f"per-step {probe_name}: {hits.mean():.3f} in {result.seconds:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    if Path(args.out).is_file():  # the parts run here replace their rows; the other parts' rows are kept
        kept = pd.read_csv(args.out)
        table = pd.concat([kept[~kept["experiment"].isin(args.parts)], table], ignore_index=True)
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    print(table.round(4).to_string(index=False))


def _row(experiment: str, backbone: str, probe: str, store: str, lr, val_acc, hits: np.ndarray, reference: np.ndarray) -> dict:
    acc = bootstrap_mean(hits)
    diff = bootstrap_mean(hits - reference)
    return {
        "experiment": experiment,
        "backbone": backbone,
        "probe": probe,
        "store": store,
        "lr": lr,
        "val_acc": val_acc,
        "test_acc": acc.estimate,
        "test_low": acc.lo,
        "test_high": acc.hi,
        "minus_reference": diff.estimate,
        "minus_reference_low": diff.lo,
        "minus_reference_high": diff.hi,
    }


if __name__ == "__main__":
    main()
