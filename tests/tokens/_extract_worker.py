"""Run by tests/tokens/test_distributed_extraction.py under torchrun: one rank of an extraction.

Usage: python -m torch.distributed.run --nproc_per_node=N _extract_worker.py CACHE_DIR OUT_DIR MODE IMAGES SHARD_SIZE
MODE: "normal"; "kill" (rank 1 kills itself with SIGKILL inside its second shard); "disagree"
(rank 1 opens another dataset, so the ranks disagree on the key). Every image a rank reads is
logged to OUT_DIR/read-<rank>.txt; an error's message goes to OUT_DIR/error-<rank>.txt.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from epviz import distributed
from epviz.backbones import load_backbone
from epviz.data import ClutteredFashionMNIST
from epviz.tokens import extract_tokens

cache_dir, out_dir, mode, images, shard_size = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
distributed.init_from_env(backend="gloo")
rank = distributed.rank()


class Logged(ClutteredFashionMNIST):
    """Canvases that log the positions read (and can kill their rank mid-shard)."""

    def image_batch(self, index):
        positions = range(*index.indices(len(self)))
        with open(out_dir / f"read-{rank}.txt", "a") as fh:
            fh.write("".join(f"{i}\n" for i in positions))
        if mode == "kill" and rank == 1 and 3 * shard_size in positions:  # rank 1 extracts shards 1 and 3: die in shard 3
            os.kill(os.getpid(), signal.SIGKILL)
        return super().image_batch(index)


seed = 4 if mode == "disagree" and rank == 1 else 3
dataset = Logged("test", images, seed=seed)
backbone = load_backbone("test_vit", pretrained=False, device="cpu")
try:
    cache = extract_tokens(backbone, dataset, [2, 5], cache_dir=cache_dir, batch_size=8, shard_size=shard_size, progress=False)
    (out_dir / f"done-{rank}.txt").write_text(cache.path.name)
except Exception as err:
    (out_dir / f"error-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    raise SystemExit(3) from err
finally:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
