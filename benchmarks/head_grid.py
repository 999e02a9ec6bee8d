"""A grid of K heads trained by fit_grid (one read of the tokens) against K separate fit calls, side by side.

Both sides train the same K grid points (lrs x weight decays) with the same seed on the same
random tokens of the zoo's shape (N = 64 patch tokens + 1 prefix token, D = 192, C = 10, fp16
memory map like a token cache), for a light probe (ep16) and a heavy one (jepa). The two sides
run in interleaved rounds (grid, separate, grid, ...) so that load changes on a shared machine
hit both alike; the report gives medians, the ratio grid / separate, and seconds per head.
It also reports the largest difference between the two sides' best validation accuracies
(0 when the grid reproduces the separate fits).

    python benchmarks/head_grid.py                                   # K = 4 lrs x 2 wds = 8
    python benchmarks/head_grid.py --samples 1024 --val 256 --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import epviz.probes as probes  # noqa: E402
from epviz.tokens import TokenSet  # noqa: E402
from epviz.training import fit, fit_grid  # noqa: E402


def random_tokens(n: int, args: argparse.Namespace, folder: Path, name: str, seed: int) -> TokenSet:
    """Random fp16 tokens written to memory maps in `folder` (or held in RAM with --in-memory)."""
    rng = np.random.default_rng(seed)
    side = int(round(args.tokens**0.5))
    shapes = {"patch": (n, args.tokens, args.dim), "prefix": (n, 1, args.dim)}
    arrays = {}
    for key, shape in shapes.items():
        data = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        if args.in_memory:
            arrays[key] = data
            continue
        mm = np.lib.format.open_memmap(folder / f"{name}_{key}.npy", mode="w+", dtype=np.float16, shape=shape)
        mm[:] = data
        mm.flush()
        arrays[key] = np.load(folder / f"{name}_{key}.npy", mmap_mode="r")
    return TokenSet(arrays["patch"], arrays["prefix"], rng.integers(0, args.classes, n), (side, side), num_classes=args.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", default="ep16,jepa", help="comma-separated probe names")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2", help="comma-separated learning rates")
    parser.add_argument("--wds", default="1e-4,1e-2", help="comma-separated weight decays")
    parser.add_argument("--samples", type=int, default=4096, help="training samples")
    parser.add_argument("--val", type=int, default=1024, help="validation samples")
    parser.add_argument("--tokens", type=int, default=64, help="patch tokens N (a square)")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "lars"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds per probe (medians are reported)")
    parser.add_argument("--device", default=None, help="default: CUDA when available")
    parser.add_argument("--in-memory", action="store_true", help="hold the tokens in RAM instead of memory maps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lrs = [float(x) for x in args.lrs.split(",")]
    wds = [float(x) for x in args.wds.split(",")]
    k = len(lrs) * len(wds)
    budget = dict(
        epochs=args.epochs,
        batch_size=args.batch,
        optimizer=args.optimizer,
        warmup_epochs=min(1, args.epochs - 1),
        precision=args.precision,
        device=args.device,
        seed=0,
        progress=False,
    )

    with tempfile.TemporaryDirectory() as tmp:
        train = random_tokens(args.samples, args, Path(tmp), "train", 0)
        val = random_tokens(args.val, args, Path(tmp), "val", 1)
        print(
            f"K = {len(lrs)} lrs x {len(wds)} wds = {k} heads; train {args.samples}, val {args.val}, N={args.tokens}+1, "
            f"D={args.dim}, C={args.classes}, {args.epochs} epochs, batch {args.batch}, {args.optimizer}, {args.precision}, "
            f"{'RAM' if args.in_memory else 'fp16 memmap'}; {torch.get_num_threads()} threads, {args.repeats} round(s)\n"
        )
        print(
            f"{'probe':<8}{'grid s':>9}{'separate s':>12}{'grid/separate':>15}{'grid s/head':>13}{'fit s/head':>12}"
            f"{'max |d val acc|':>17}"
        )
        for name in args.probes.split(","):
            grid_s, sep_s, diff = [], [], 0.0
            for _ in range(args.repeats):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a diverged point is part of the result
                    result = fit_grid(name, train, val, lrs=lrs, weight_decays=wds, **budget)
                grid_s.append(time.perf_counter() - start)

                start = time.perf_counter()
                accs = []
                for lr in lrs:
                    for wd in wds:
                        probe = probes.build(name, args.dim, args.classes, seed=0)
                        try:
                            accs.append(fit(probe, train, val, lr=lr, weight_decay=wd, **budget).best_acc)
                        except FloatingPointError:
                            accs.append(float("nan"))
                sep_s.append(time.perf_counter() - start)
                both = np.array([result.points["best_val_acc"].to_numpy(float), accs])
                diff = max(diff, float(np.nanmax(np.abs(both[0] - both[1]), initial=0.0)))
            g, s = statistics.median(grid_s), statistics.median(sep_s)
            print(f"{name:<8}{g:>9.2f}{s:>12.2f}{g / s:>15.2f}{g / k:>13.3f}{s / k:>12.3f}{diff:>17.2g}")


if __name__ == "__main__":
    main()
