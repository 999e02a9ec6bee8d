"""The embedded tiny backbones: architecture, weights (safetensors) and model cards (JSON).

Every entry has the same shape (64 px, patch 8, D=192, 6 blocks, [CLS]). ``tiny-mae`` and
``tiny-sup`` are pre-trained by ``scripts/train_zoo.py`` on cluttered Fashion-MNIST canvases;
``tiny-random`` is the seeded random initialisation (no file), the control every analysis is
compared against. The pre-training axis (:data:`ENTRIES`) adds checkpoints along one 20-epoch MAE
run (``tiny-mae@<epoch>``; ``tiny-mae@0`` is that run's initialisation, which is exactly
``tiny-random``), a joint-embedding backbone trained through [CLS] (``tiny-ssl``), second
pre-training seeds (``-seed1``) and the pixel control ``tiny-pixels`` (tokens are the normalised
pixels of each patch, [CLS] their mean, no file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "ZOO",
    "ZOO_DIR",
    "available",
    "ENTRIES",
    "ZooEntry",
    "mae_run",
    "PixelPatches",
    "ARCHITECTURE",
    "NORMALIZATION",
    "RANDOM_SEED",
    "build_zoo_vit",
    "zoo_card",
    "zoo_weights",
    "file_sha256",
]

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooEntry:
    """What a zoo backbone is, for tables and the pre-training axis.

    Attributes:
        family: MIM, JEA, SUP or control.
        method: The pre-training method ("MAE", "SimCLR", "supervised", "random init", "pixels").
        epochs: Epochs of pre-training over the 60,000 training items (0: none).
        seed: The pre-training seed (the initialisation and the data order).
        file: Whether the entry ships a weights file (tiny-random, tiny-mae@0 and tiny-pixels do not).
    """

    family: str
    method: str
    epochs: int
    seed: int = 0
    file: bool = True


ENTRIES: dict[str, ZooEntry] = {
    "tiny-mae": ZooEntry("MIM", "MAE", 7),
    "tiny-sup": ZooEntry("SUP", "supervised", 5),
    "tiny-random": ZooEntry("control", "random init", 0, file=False),
    "tiny-mae@0": ZooEntry("MIM", "MAE", 0, file=False),
    "tiny-mae@2": ZooEntry("MIM", "MAE", 2),
    "tiny-mae@7": ZooEntry("MIM", "MAE", 7),
    "tiny-mae@20": ZooEntry("MIM", "MAE", 20),
    "tiny-mae-seed1": ZooEntry("MIM", "MAE", 7, seed=1),
    "tiny-ssl": ZooEntry("JEA", "SimCLR", 3),
    "tiny-ssl-seed1": ZooEntry("JEA", "SimCLR", 2, seed=1),
    "tiny-pixels": ZooEntry("control", "pixels", 0, file=False),
}
ZOO = tuple(ENTRIES)
CORE = ("tiny-mae", "tiny-sup", "tiny-random")
"""The three backbones the notebooks and the Explorer open by default."""
ARCHITECTURE: dict[str, Any] = dict(
    img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, class_token=True, global_pool="token"
)
NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
RANDOM_SEED = 0


def mae_run() -> dict[str, int]:
    """The checkpoints of the zoo's one MAE run, name -> pre-training epoch; its initialisation (``tiny-mae@0``)
    is named ``tiny-random``, the same weights."""
    return {"tiny-random": 0, **{n: e.epochs for n, e in ENTRIES.items() if n.startswith("tiny-mae@") and e.file}}


def available() -> tuple[str, ...]:
    """The entries that load on this install: those without a file, and those whose weights and card are here."""
    return tuple(
        n
        for n, e in ENTRIES.items()
        if not e.file or (zoo_weights(n).is_file() and zoo_weights(n).with_suffix(".json").is_file())
    )


def build_zoo_vit(num_classes: int = 0) -> VisionTransformer:
    """The zoo architecture (64 px, patch 8, D=192, depth 6, 3 heads, [CLS]), randomly initialised."""
    return VisionTransformer(num_classes=num_classes, **ARCHITECTURE)


def zoo_weights(name: str) -> Path:
    """Path of a zoo backbone's safetensors file."""
    return ZOO_DIR / f"{name}.safetensors"


def zoo_card(name: str) -> dict:
    """The model card of a zoo backbone (the entries without a file have a card made on the fly)."""
    objective = {
        "tiny-random": "none (seeded random initialisation)",
        "tiny-mae@0": "none: the initialisation of the 20-epoch tiny-mae run (seed 0), identical to tiny-random",
        "tiny-pixels": "none: tokens are the normalised pixels of each 8x8x3 patch, [CLS] is their mean, every block is the identity",
    }
    if name in objective:
        return {
            "name": name,
            "objective": objective[name],
            "seed": RANDOM_SEED,
            "architecture": ARCHITECTURE,
            "normalization": NORMALIZATION,
        }
    path = ZOO_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model card {path} is missing; the zoo is incomplete — reinstall epviz or run scripts/train_zoo.py"
        )
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def random_state_dict(seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """The seeded random initialisation of tiny-random (and of the pre-training run of that seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_zoo_vit().state_dict()


class PixelPatches(VisionTransformer):
    """The pixel control: the zoo architecture made to pass its input through unchanged.

    The patch embedding copies each patch's normalised pixels, in (row, column, channel) order,
    to the D = 8 * 8 * 3 = 192 channels; there is no position embedding; [CLS] is the mean of the
    patch tokens; every block's residual branches and the final norm output zero and identity, so
    every layer's tokens are the pixels.
    """

    def __init__(self) -> None:
        super().__init__(num_classes=0, **ARCHITECTURE)
        patch, dim = int(ARCHITECTURE["patch_size"]), int(ARCHITECTURE["embed_dim"])
        with torch.no_grad():
            for param in self.parameters():
                param.zero_()
            channel = torch.arange(dim)
            c, pixel = channel % 3, channel // 3
            self.patch_embed.proj.weight[channel, c, pixel // patch, pixel % patch] = 1.0
        self.norm = torch.nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
