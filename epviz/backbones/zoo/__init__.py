"""The embedded tiny backbones: architecture, weights (safetensors) and model cards (JSON).

``tiny-mae`` and ``tiny-sup`` are pre-trained by ``scripts/train_zoo.py`` on cluttered
Fashion-MNIST canvases; ``tiny-random`` is the same architecture with a seeded random
initialisation (no file), the control every analysis is compared against.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "ZOO",
    "ZOO_DIR",
    "ARCHITECTURE",
    "NORMALIZATION",
    "RANDOM_SEED",
    "build_zoo_vit",
    "zoo_card",
    "zoo_weights",
    "file_sha256",
]

ZOO_DIR = Path(__file__).resolve().parent
ZOO = ("tiny-mae", "tiny-sup", "tiny-random")
ARCHITECTURE: dict[str, Any] = dict(
    img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, class_token=True, global_pool="token"
)
NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
RANDOM_SEED = 0


def build_zoo_vit(num_classes: int = 0) -> VisionTransformer:
    """The zoo architecture (64 px, patch 8, D=192, depth 6, 3 heads, [CLS]), randomly initialised."""
    return VisionTransformer(num_classes=num_classes, **ARCHITECTURE)


def zoo_weights(name: str) -> Path:
    """Path of a zoo backbone's safetensors file."""
    return ZOO_DIR / f"{name}.safetensors"


def zoo_card(name: str) -> dict:
    """The model card of a zoo backbone (tiny-random has a card made on the fly)."""
    if name == "tiny-random":
        return {
            "name": name,
            "objective": "none (seeded random initialisation)",
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


def random_state_dict() -> dict[str, torch.Tensor]:
    """The seeded random initialisation of tiny-random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build_zoo_vit().state_dict()
