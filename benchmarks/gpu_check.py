"""The CUDA paths against the CPU ones, in one short run (under 5 minutes on one GPU).

1. Extraction of 2,000 canvases with tiny-mae in bf16 on CUDA against the CPU cache of the same key
   (two cache folders: the device is not part of the key): the tokens agree within bf16 tolerance.
2. EP16 ``fit`` on CUDA against CPU on those tokens: the same history within tolerance.
3. A 1-GPU NCCL process group (``torchrun --nproc_per_node=1``) through the code path the gloo tests
   take: ``epviz extract`` and ``epviz train`` under torchrun.
4. Images/s of extraction and seconds of one probe epoch on the GPU (the README's GPU figures).

    python benchmarks/gpu_check.py            # exits non-zero when a check fails
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from epviz.backbones import load_backbone  # noqa: E402
from epviz.data import load_split  # noqa: E402
from epviz.probes import build  # noqa: E402
from epviz.tokens import extract_tokens  # noqa: E402
from epviz.training import fit  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    failures = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    data = {split: load_split("cluttered-fashion-mnist", split, size) for split, size in (("train", 2000), ("val", 500))}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for device in ("cpu", "cuda"):
            bb = load_backbone("tiny-mae", device=device)
            start = time.perf_counter()
            caches[device] = {
                split: extract_tokens(bb, ds, [-1], precision="bf16", device=device, cache_dir=f"{tmp}/{device}", progress=False)
                for split, ds in data.items()
            }
            torch.cuda.synchronize()
            rate = 2500 / (time.perf_counter() - start)
            print(f"1. extraction on {device}: {rate:.0f} img/s (2,500 canvases, bf16, incl. writes)")
        cpu, gpu = (np.asarray(caches[d]["train"].patch(-1), dtype=np.float32) for d in ("cpu", "cuda"))
        scale = np.abs(cpu).max()
        worst = float(np.abs(cpu - gpu).max() / scale)
        print(f"   CUDA vs CPU tokens: max |diff| / max |token| = {worst:.4f} (bf16 tolerance 0.03)")
        if worst > 0.03:
            failures.append(f"extraction differs: {worst:.4f}")
        histories = {}
        for device in ("cpu", "cuda"):
            train, val = (caches["cpu"][s].tokens(-1, in_memory=True) for s in ("train", "val"))
            probe = build("ep16", train.dim, train.num_classes, seed=0)
            result = fit(probe, train, val, epochs=3, batch_size=256, lr=1e-2, precision="fp32", device=device, progress=False)
            histories[device] = result.history
            print(f"2. EP16 fit on {device}: val top-1 per epoch {result.history['val_acc'].round(4).tolist()}, "
                  f"one epoch {result.history['seconds'].iloc[-1]:.2f} s")  # fmt: skip
        gap = float(np.abs(histories["cpu"]["val_acc"].to_numpy() - histories["cuda"]["val_acc"].to_numpy()).max())
        if gap > 0.02:
            failures.append(f"fit differs between CPU and CUDA: val top-1 gap {gap:.3f}")
        env = dict(os.environ, PYTHONPATH=str(ROOT), EPVIZ_CACHE=f"{tmp}/nccl")
        for args in (
            ["extract", "--backbone", "tiny-mae", "--size", "512", "--precision", "bf16"],
            [
                "train",
                "--backbone",
                "tiny-mae",
                "--probes",
                "ep16",
                "--setting",
                "fast",
                "--sizes",
                "train=512",
                "val=128",
                "test=128",
            ],
        ):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "epviz", *args]
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            ok = run.returncode == 0
            print(f"3. torchrun (NCCL, 1 GPU) epviz {args[0]}: {'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append(f"torchrun epviz {args[0]}: {run.stderr[-1500:]}")
    print(json.dumps({"failures": failures}))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
