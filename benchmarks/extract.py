"""Token-extraction throughput of extract_tokens, as a ratio to a bare forward_intermediates loop.

Both run on the same model, the same images, batch size and precision, interleaved
(bare, epviz, bare, epviz, ...) so machine noise hits both alike. The epviz side includes
everything it does for real: input transform, fp16 conversion, memory-mapped writes,
the atomic rename. Target: ratio >= 0.9.

    python benchmarks/extract.py [--backbone tiny-mae] [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz.backbones import load_backbone  # noqa: E402
from epviz.data import ClutteredFashionMNIST  # noqa: E402
from epviz.runtime import autocast, resolve_device  # noqa: E402
from epviz.tokens import extract_tokens  # noqa: E402


def bare_loop(bb, images: torch.Tensor, layers: list[int], batch_size: int, precision: str, device) -> float:
    mean = torch.tensor(bb.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bb.std, device=device).view(1, 3, 1, 1)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for s in range(0, len(images), batch_size):
            x = (images[s : s + batch_size].to(device).float() / 255.0 - mean) / std
            bb.model.forward_intermediates(
                x, indices=layers, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True, stop_early=True
            )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-mae")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device()
    bb = load_backbone(args.backbone, device=device)
    ds = ClutteredFashionMNIST("test", args.images, seed=0)
    layers = list(range(bb.depth))
    bare_loop(bb, ds.images[:256], layers, args.batch_size, args.precision, device)  # warm-up
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(bb, ds.images, layers, args.batch_size, args.precision, device))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            extract_tokens(
                bb, ds, layers, batch_size=args.batch_size, precision=args.precision, cache_dir=tmp, device=device, progress=False
            )
            ours.append(time.perf_counter() - start)
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"backbone {bb.name}, {args.images} images, all {len(layers)} blocks, batch {args.batch_size}, {args.precision}, {device}"
    )
    print(f"bare forward_intermediates: {args.images / b:8.1f} img/s  (median of {args.repeats})")
    print(f"epviz extract_tokens:       {args.images / o:8.1f} img/s  (to fp16 memmaps on disk)")
    print(f"throughput ratio epviz / bare: {b / o:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
