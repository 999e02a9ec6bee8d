"""Probe the zoo backbones on cluttered Fashion-MNIST and write the zoo's evaluation table.

Protocol (cached tokens of the last block, no augmentation, the same budget for every
probe and backbone): train on 20,000 train canvases (seed 0), pick the best epoch on
2,000 held-out train canvases (seed 1), report top-1 on 4,000 test canvases (seed 0).

    python scripts/evaluate_zoo.py                      # -> epviz/zoo/evaluation.{csv,json}
    python scripts/evaluate_zoo.py --probes cls gap ep:16 --train-size 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import probes  # noqa: E402
from epviz.atomic import atomic_write, atomic_write_text  # noqa: E402
from epviz.backbones import load_backbone  # noqa: E402
from epviz.backbones.zoo import CORE, ZOO_DIR  # noqa: E402
from epviz.data import ClutteredFashionMNIST  # noqa: E402
from epviz.evaluate import accuracy  # noqa: E402
from epviz.tokens import extract_tokens  # noqa: E402
from epviz.training import fit  # noqa: E402


def parse_probe(spec: str) -> tuple[str, dict]:
    """'ep:16' -> ('ep', {'num_queries': 16}); 'mhca' -> ('mhca', {})."""
    name, _, arg = spec.partition(":")
    return name, ({"num_queries": int(arg)} if arg else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(CORE))
    parser.add_argument("--probes", nargs="+", default=["cls", "gap", "ep:8", "ep:16", "ep:32", "mhca"])
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--val-size", type=int, default=2_000)
    parser.add_argument("--test-size", type=int, default=4_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "lars"])
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ZOO_DIR / "evaluation")
    parser.add_argument("--update", action="store_true", help="keep the rows of other backbones already in the table")
    args = parser.parse_args()

    sets = {
        "train": ClutteredFashionMNIST("train", args.train_size, seed=0),
        "val": ClutteredFashionMNIST("train", args.val_size, seed=1),
        "test": ClutteredFashionMNIST("test", args.test_size, seed=0),
    }
    rows = []
    for name in args.backbones:
        bb = load_backbone(name)
        tokens = {k: extract_tokens(bb, ds, [-1], precision="fp32").tokens(-1, in_memory=True) for k, ds in sets.items()}
        for spec in args.probes:
            kind, options = parse_probe(spec)
            probe = probes.build(kind, bb.dim, 10, seed=args.seed, **options)
            start = time.time()
            result = fit(
                probe,
                tokens["train"],
                tokens["val"],
                epochs=args.epochs,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                weight_decay=args.weight_decay,
                warmup_epochs=args.warmup_epochs,
                seed=args.seed,
                progress=False,
            )
            test = accuracy(result.probe, tokens["test"], topk=(1,))
            rows.append(
                {
                    "backbone": name,
                    "probe": spec,
                    "num_classes": 10,
                    "layer": bb.depth - 1,
                    "params": probes.trainable_params(probe),
                    "val_acc": result.best_acc,
                    "best_epoch": result.best_epoch,
                    "test_acc": test["top1"],
                    "train_seconds": round(time.time() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    previous = args.out.with_suffix(".csv")
    if args.update and previous.is_file():
        kept = pd.read_csv(previous)
        table = pd.concat([kept[~kept["backbone"].isin(args.backbones)], table], ignore_index=True)
    atomic_write(args.out.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    protocol = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("backbones", "update")}
    protocol["backbones"] = sorted(table["backbone"].unique())
    protocol["description"] = (
        "cached last-block tokens (no final norm, no augmentation); best epoch chosen on held-out "
        "train canvases (seed 1); top-1 on test canvases (Fashion-MNIST test items, seed 0)"
    )
    protocol["torch_threads"] = torch.get_num_threads()
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(protocol, indent=2) + "\n")
    print(table.pivot(index="probe", columns="backbone", values="test_acc").round(3).to_string())


if __name__ == "__main__":
    main()
