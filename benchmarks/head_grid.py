"""K stacked heads (one training of a HeadStack) against K separate fits, side by side.

Each measurement is one epoch of the training engine (:func:`epviz.training.engine.train`) on random
fp16 tokens of the zoo's shape held as memory maps like a token cache (N = 64 patch tokens + 1 prefix,
D = 192, C = 10, batch 256): the token reads, forward, backward and optimiser steps, no validation.
"Separate" is K times the epoch of one head (a fit), so the ratio stacked / separate is what a grid
of K saves; "x one head" is the stacked epoch over one head's, the GPU target's unit (K = 8: at most 1.5).
Rows cover K = 1, 8, 16, 64, fp32 and bf16, 1 and 2 threads, for EP16, jepa, MHCA and LP (cls), and CUDA
when one is present. Medians over --repeats rounds (2), after one warm-up epoch per probe.

    python benchmarks/head_grid.py                          # the full table
    python benchmarks/head_grid.py --probes ep16 --ks 1,8 --threads 2 --precisions fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import epviz.probes as probes  # noqa: E402
from epviz.tokens import TokenSet  # noqa: E402
from epviz.training import engine  # noqa: E402
from epviz.training.fit import TokenBatches  # noqa: E402
from epviz.training.stack import HeadStack  # noqa: E402


def random_tokens(n: int, args: argparse.Namespace, folder: Path) -> TokenSet:
    """Random fp16 tokens written to memory maps in `folder`."""
    rng = np.random.default_rng(0)
    side = int(round(args.tokens**0.5))
    arrays = {}
    for key, shape in {"patch": (n, args.tokens, args.dim), "prefix": (n, 1, args.dim)}.items():
        mm = np.lib.format.open_memmap(folder / f"{key}.npy", mode="w+", dtype=np.float16, shape=shape)
        mm[:] = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        mm.flush()
        arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r")
    return TokenSet(arrays["patch"], arrays["prefix"], rng.integers(0, args.classes, n), (side, side), num_classes=args.classes)


def epoch_seconds(name: str, k: int, tokens: TokenSet, args: argparse.Namespace, precision: str, device: torch.device) -> float:
    """Seconds of one training epoch of a stack of `k` heads of `name` (median over the rounds)."""
    times = []
    for _ in range(args.repeats):
        stack = HeadStack([probes.build(name, args.dim, args.classes, seed=s) for s in range(k)], device)
        start = time.perf_counter()
        engine.train(
            stack,
            TokenBatches(tokens, None, args.batch, 0, device),
            engine.Recipe(1, "adamw", 0.0, precision=precision),
            [1e-3] * k,
            [1e-4] * k,
            device=device,
            desc=name,
            progress=False,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", default="ep16,jepa,mhca,cls", help="comma-separated probe names")
    parser.add_argument("--ks", default="1,8,16,64", help="comma-separated stack sizes")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch")
    parser.add_argument("--tokens", type=int, default=64, help="patch tokens N (a square)")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="rounds per cell (medians are reported)")
    args = parser.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        tokens = random_tokens(args.steps * args.batch, args, Path(tmp))
        print(
            f"one epoch = {args.steps} steps of batch {args.batch}, N={args.tokens}+1, D={args.dim}, C={args.classes}, "
            f"AdamW, fp16 memmap tokens; separate = K x one head's epoch\n"
        )
        print(
            f"{'device':<7}{'thr':>4}{'prec':>6}{'probe':>7}{'mode':>6}{'K':>4}{'stacked s':>11}{'separate s':>12}{'stacked/sep':>13}{'x one head':>12}"
        )
        for device in devices:
            for threads in [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                for precision in args.precisions.split(","):
                    for name in args.probes.split(","):
                        mode = HeadStack([probes.build(name, args.dim, args.classes)], device).mode
                        epoch_seconds(
                            name, 1, tokens, argparse.Namespace(**{**vars(args), "repeats": 1}), precision, device
                        )  # warm-up
                        one = epoch_seconds(name, 1, tokens, args, precision, device)
                        for k in ks:
                            stacked = one if k == 1 else epoch_seconds(name, k, tokens, args, precision, device)
                            print(
                                f"{device.type:<7}{threads:>4}{precision:>6}{name:>7}{mode:>6}{k:>4}{stacked:>11.2f}{k * one:>12.2f}"
                                f"{stacked / (k * one):>13.2f}{stacked / one:>12.2f}",
                                flush=True,
                            )


if __name__ == "__main__":
    main()
