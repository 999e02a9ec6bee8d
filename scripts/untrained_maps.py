"""How well do an untrained probe's maps localise? The chance line a trained probe's MaxBoxAccV2 is read against.

For every zoo backbone (last block, the same 500 test canvases as notebook 02's localization columns and
the same thresholds), the probes of ``--probes`` are built with ``--seeds`` initialisation seeds and
measured without any training (``epviz.analysis.untrained_probe_baselines``): lift on the object mask
and box (mass above chance), MaxBoxAccV2, in-box mass and normalised entropy, means over each probe's
predictors, with the lowest and highest predictor's MaxBoxAccV2. The
summary gives the mean and the standard deviation over seeds. Nothing is trained, the labels are not read.

    python scripts/untrained_maps.py [--backbones tiny-mae tiny-sup tiny-random tiny-pixels] [--probes ep16 mhca]
                                     [--seeds 0 1 2] [--images 500] [--out docs/untrained_maps.csv] [--fast]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import Setting, extract_tokens, load_backbone  # noqa: E402
from epviz.analysis import untrained_probe_baselines  # noqa: E402
from epviz.atomic import atomic_write  # noqa: E402
from epviz.data import ClutteredFashionMNIST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(backbones: list[str], probes: list[str], seeds: list[int], images: int, setting: Setting) -> pd.DataFrame:
    """One row per (backbone, probe, seed): the untrained probe's localization on the test canvases."""
    test = ClutteredFashionMNIST("test", int(setting.sizes["test"] or 4_000))
    index = list(range(min(images, len(test))))
    rows = []
    for name in backbones:
        tokens = extract_tokens(load_backbone(name), test, layers=[-1]).tokens(-1)
        for probe in probes:
            start = time.perf_counter()
            context = {"backbone": name, "layer": tokens.origin.layer, "probe": probe}
            table = untrained_probe_baselines(
                probe, tokens, test, seeds=seeds, index=index, thresholds=setting.thresholds, context=context
            )
            rows.append(table.assign(images=len(index)))
            print(
                f"{name} {probe}: mask lift {table['mask_lift'].mean():+.4f}, MaxBoxAccV2 {table['maxboxacc_v2'].mean():.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return pd.concat(rows, ignore_index=True)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over the seeds, per backbone and probe."""
    measures = [
        "mask_lift",
        "mask_lift_px",
        "box_lift",
        "maxboxacc_v2",
        "maxboxacc_v2_min",
        "maxboxacc_v2_max",
        "inbox_mass",
        "chance_mass",
        "entropy_norm",
    ]
    grouped = table.groupby(["backbone", "probe"], sort=False)
    out = grouped[measures].mean()
    out["mask_lift_std"] = grouped["mask_lift"].std(ddof=1)  # NaN with one seed
    out["maxboxacc_v2_std"] = grouped["maxboxacc_v2"].std(ddof=1)
    out["seeds"] = grouped.size()
    return out.reset_index()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["tiny-mae", "tiny-sup", "tiny-random", "tiny-pixels"])
    parser.add_argument("--probes", nargs="+", default=["ep16", "mhca"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=500, help="test canvases measured (notebook 02: the first 500)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "untrained_maps.csv")
    parser.add_argument("--fast", action="store_true", help="the fast setting's sizes and thresholds (a pipeline check)")
    args = parser.parse_args(argv)
    setting = Setting.fast() if args.fast else Setting.full()
    table = measure(args.backbones, args.probes, args.seeds, args.images, setting)
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    print(summary(table).round(3).to_string(index=False))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
