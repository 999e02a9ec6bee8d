"""What the storage choices cost in accuracy: int8 against float16 tokens, and K stored views against none.

On the zoo (tiny-mae, tiny-sup and the random-init control tiny-random; the notebooks' full sizes:
20,000 train, 2,000 val, 4,000 test canvases; last block), LP, EP16 and MHCA are trained with the
standard setting's tuning budget (the grid of learning rates, selected on val) on

* ``float16``: the notebooks' token caches;
* ``int8``: the same images stored as int8 with a per-token scale;
* ``views4``: 4 stored RandomResizedCrop + flip views per training image, one drawn per image per
  epoch (val and test tokens are the un-augmented float16 ones);

and, with ``--per-step``, EP16 and LP on tiny-mae under the per-step protocol (``fit_images``:
the backbone runs on a fresh crop at every step), at the learning rate the float16 grid chose (one
run each: the per-step protocol is too slow on 2 CPU cores for a grid).

Top-1 on the test canvases with a 95% bootstrap interval, and the paired difference to float16
(the same test images) with its interval. Writes ``docs/storage_and_views.csv``.

    python scripts/storage_and_views.py [--per-step] [--views 4] [--fast] [--out docs/storage_and_views.csv]
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
from epviz.analysis.intervals import bootstrap_mean  # noqa: E402
from epviz.atomic import atomic_write  # noqa: E402
from epviz.backbones import load_backbone  # noqa: E402
from epviz.evaluate import predict  # noqa: E402
from epviz.probes import build  # noqa: E402
from epviz.tokens import extract_tokens  # noqa: E402
from epviz.training import fit_images, probe_zoo  # noqa: E402

BACKBONES = ("tiny-mae", "tiny-sup", "tiny-random")
PROBES = ("cls", "ep16", "mhca")


def correct(probe, tokens) -> np.ndarray:
    """Per test image: 1 when the probe's top-1 is right."""
    out = predict(probe, tokens)
    return (np.asarray(out.logits).argmax(1) == tokens.labels).astype(np.float64)


def store_tokens(study, dtype: str, views: int) -> dict[str, dict]:
    """The last block's tokens per backbone: `dtype` (train with `views` views), val and test un-augmented."""
    out = {}
    for name in study.backbones:
        bb = load_backbone(name)
        sets = {}
        for split, data in study.sets.items():
            k = views if split == "train" else 1
            cache = extract_tokens(bb, data, [-1], dtype=dtype, views=k, progress=True)
            sets[split] = cache.tokens(-1, in_memory=True)
        out[name] = sets
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-step", action="store_true", help="also EP16 and LP on tiny-mae under the per-step protocol")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--fast", action="store_true", help="the fast setting (a check of the script, not a measurement)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "storage_and_views.csv"))
    args = parser.parse_args()
    setting = Setting.fast() if args.fast else Setting.full()
    study = open_study(BACKBONES, setting=setting, figures="/tmp/epviz-storage-figures")
    budget = setting.fit_options()
    stores = {
        "float16": study.tokens,
        "int8": store_tokens(study, "int8", 1),
        f"views{args.views}": store_tokens(study, "float16", args.views),
    }
    rows, reference = [], {}
    for store, tokens in stores.items():
        start = time.perf_counter()
        runs, fitted = probe_zoo(tokens, list(PROBES), budget=budget, progress=True)
        print(f"{store}: {len(runs)} tuned runs in {time.perf_counter() - start:.0f} s", flush=True)
        for run in runs.itertuples():
            hits = correct(fitted[run.backbone, run.probe], tokens[run.backbone]["test"])
            if store == "float16":
                reference[run.backbone, run.probe] = hits
            rows.append(_row(run.backbone, run.probe, store, run.lr, run.val_acc, hits, reference[run.backbone, run.probe]))
    if args.per_step:
        chosen = {r["probe"]: r["lr"] for r in rows if r["store"] == "float16" and r["backbone"] == "tiny-mae"}
        bb = load_backbone("tiny-mae")
        train, val = study.sets["train"], study.sets["val"]
        test = study.tokens["tiny-mae"]["test"]
        for probe_name in ("ep16", "cls"):
            probe = build(probe_name, bb.dim, test.num_classes, seed=0)
            options = {k: v for k, v in budget.items() if k not in ("grid", "lr", "weight_decay")}
            result = fit_images(probe, bb, train, val, lr=chosen[probe_name], weight_decay=1e-4, progress=True, **options)
            hits = correct(result.probe, test)
            rows.append(
                _row(
                    "tiny-mae",
                    probe_name,
                    "per-step",
                    chosen[probe_name],
                    result.best_acc,
                    hits,
                    reference["tiny-mae", probe_name],
                )
            )
            print(f"per-step {probe_name}: {hits.mean():.3f} in {result.seconds:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    print(table.round(4).to_string(index=False))


def _row(backbone: str, probe: str, store: str, lr, val_acc, hits: np.ndarray, reference: np.ndarray) -> dict:
    acc = bootstrap_mean(hits)
    diff = bootstrap_mean(hits - reference)
    return {
        "backbone": backbone,
        "probe": probe,
        "store": store,
        "lr": lr,
        "val_acc": val_acc,
        "test_acc": acc.estimate,
        "test_low": acc.lo,
        "test_high": acc.hi,
        "minus_float16": diff.estimate,
        "minus_float16_low": diff.lo,
        "minus_float16_high": diff.hi,
    }


if __name__ == "__main__":
    main()
