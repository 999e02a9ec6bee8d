"""Scaling measurements, each a ratio of two things measured side by side in one run.

1. Extraction throughput with 2 processes (``torchrun --nproc_per_node=2 -m epviz extract``, one
   thread each) against 1 process (one thread, and all threads): images/s of the whole command,
   process start included.
2. One probe epoch's token read (shuffled batches of a memory-mapped fp16 cache, converted to fp32
   tensors, as ``fit`` reads them) against a plain sequential read of the same bytes (the floor).
3. The same epoch read, and one EP16 training epoch, from an int8 cache against the fp16 cache.
4. Peak RSS of extraction at 10k and 100k synthetic 224 px images through a small timm ViT (one
   block, 32 px patches), each in a fresh process: it must not grow with the dataset.

    python benchmarks/scale.py [--images 8000] [--rss-images 10000 100000] [--parts 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from epviz.backbones import load_backbone  # noqa: E402
from epviz.data import load_split  # noqa: E402
from epviz.probes import build  # noqa: E402
from epviz.tokens import TokenCache, extract_tokens  # noqa: E402
from epviz.training import fit  # noqa: E402

RSS_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    from epviz.backbones import load_backbone
    from epviz.tokens import extract_tokens

    class Synthetic:
        # ImageBatches: 224 px uint8 images drawn on the fly from their index (never held in memory)
        def __init__(self, n):
            self.n, self.num_classes = n, 10
            self.labels = np.arange(n) % 10
        def __len__(self):
            return self.n
        def image_batch(self, index):
            idx = range(*index.indices(self.n))
            g = torch.Generator().manual_seed(idx[0])
            return torch.randint(0, 256, (len(idx), 3, 224, 224), dtype=torch.uint8, generator=g)
        def fingerprint(self):
            return {"dataset": "synthetic-224", "images": self.n}

    torch.set_num_threads(int(sys.argv[3]))
    bb = load_backbone("vit_tiny_patch16_224", pretrained=False, device="cpu", depth=1, patch_size=32)
    cache = extract_tokens(bb, Synthetic(int(sys.argv[1])), [0], cache_dir=sys.argv[2], batch_size=256, progress=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": len(cache), "peak_rss_mb": rss, "seconds": cache.meta["seconds"]}))
    """
)


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _extract_command(procs: int, images: int, cache: Path) -> list[str]:
    args = ["extract", "--backbone", "tiny-mae", "--split", "train", "--size", str(images), "--precision", "bf16"]
    args += ["--cache-dir", str(cache)]
    if procs == 1:
        return [sys.executable, "-m", "epviz", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "epviz", *args]


def extraction(images: int, threads_all: int) -> None:
    print(f"\n1. extraction of {images} canvases with tiny-mae (bf16), the whole `epviz extract` command")
    runs = [
        ("1 process, 1 thread", 1, 1),
        (f"1 process, {threads_all} threads", 1, threads_all),
        ("2 processes, 1 thread each", 2, 1),
    ]
    rates = {}
    for label, procs, threads in runs:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            done = subprocess.run(_extract_command(procs, images, Path(tmp)), env=_env(threads), capture_output=True, text=True)
            seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
        rates[label] = images / seconds
        print(f"   {label:<28} {seconds:7.1f} s  {rates[label]:8.0f} img/s")
    base = rates["1 process, 1 thread"]
    print(f"   ratio 2 processes / 1 process (1 thread each): {rates['2 processes, 1 thread each'] / base:.2f}")
    print(
        f"   ratio 2 processes / 1 process with {threads_all} threads: {rates['2 processes, 1 thread each'] / rates[runs[1][0]]:.2f}"
    )


def _epoch_read(tokens, batch_size: int = 256) -> float:
    start = time.perf_counter()
    for batch in tokens.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)):
        batch.patch.sum()  # touch the tensor
    return time.perf_counter() - start


def _sequential_read(paths: list[Path]) -> float:
    buffer = bytearray(16 * 2**20)  # one reused buffer: the cost of moving the bytes, nothing else
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - start


def _train_epoch(tokens, val) -> float:
    probe = build("ep16", tokens.dim, tokens.num_classes, seed=0)
    result = fit(probe, tokens, val, epochs=1, batch_size=256, lr=1e-2, precision="bf16", warmup_epochs=0, progress=False)
    return float(result.history["seconds"].iloc[0]) if "seconds" in result.history else result.seconds


def reads(images: int, repeats: int) -> None:
    print(f"\n2-3. one epoch over {images} cached train canvases (tiny-mae, last block), best of {repeats}")
    bb = load_backbone("tiny-mae")
    data = load_split("cluttered-fashion-mnist", "train", images)
    val = load_split("cluttered-fashion-mnist", "val", 1000)
    with tempfile.TemporaryDirectory() as tmp:
        caches = {
            dtype: extract_tokens(bb, data, [-1], dtype=dtype, precision="bf16", cache_dir=tmp, progress=False)
            for dtype in ("float16", "int8")
        }
        val_tokens = extract_tokens(bb, val, [-1], precision="bf16", cache_dir=tmp, progress=False).tokens(-1)
        files = {dtype: sorted(c.path.glob("L*.npy")) for dtype, c in caches.items()}
        tokens = {dtype: TokenCache.open(c.path).tokens(-1) for dtype, c in caches.items()}
        _epoch_read(tokens["float16"])  # warm the page cache for both
        _epoch_read(tokens["int8"])
        floor = min(_sequential_read(files["float16"]) for _ in range(repeats))
        read = {dtype: min(_epoch_read(t) for _ in range(repeats)) for dtype, t in tokens.items()}
        size = {dtype: sum(p.stat().st_size for p in f) for dtype, f in files.items()}
        print(f"   sequential read of the fp16 files ({size['float16'] / 1e6:.0f} MB): {floor:.3f} s (the floor)")
        print(f"   epoch read, fp16: {read['float16']:.3f} s   ratio to the floor: {read['float16'] / floor:.1f}")
        print(
            f"   epoch read, int8 ({size['int8'] / 1e6:.0f} MB, {size['int8'] / size['float16']:.2f} of fp16): {read['int8']:.3f} s"
        )
        print(f"   ratio int8 / fp16 epoch read: {read['int8'] / read['float16']:.2f}")
        train = {dtype: min(_train_epoch(t, val_tokens) for _ in range(repeats)) for dtype, t in tokens.items()}
        print(f"   EP16 training epoch (bf16, batch 256): fp16 {train['float16']:.2f} s, int8 {train['int8']:.2f} s, "
              f"ratio int8 / fp16 {train['int8'] / train['float16']:.2f}")  # fmt: skip


def peak_rss(counts: list[int], threads: int) -> None:
    print("\n4. peak RSS of extraction, synthetic 224 px images, vit_tiny (1 block, 32 px patches), fresh process each")
    results = []
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-c", RSS_WORKER, str(count), tmp, str(threads)],
                env=_env(threads),
                capture_output=True,
                text=True,
            )
        if done.returncode != 0:
            raise SystemExit(f"RSS run of {count} images failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"   {row['images']:>7} images: peak RSS {row['peak_rss_mb']:7.0f} MB ({row['seconds']:.0f} s)")
    print(
        f"   ratio peak RSS {counts[-1]} / {counts[0]} images: {results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f} (target: about 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000, help="canvases of the extraction and epoch measurements")
    parser.add_argument("--rss-images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parts", type=int, nargs="+", default=[1, 2, 4], help="1: extraction, 2: epoch reads (2-3), 4: peak RSS"
    )
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {threads} threads")
    if 1 in args.parts:
        extraction(args.images, threads)
    if 2 in args.parts:
        reads(args.images, args.repeats)
    if 4 in args.parts:
        peak_rss(sorted(args.rss_images), threads)


if __name__ == "__main__":
    main()
