"""A dataset kind in one file: ``toy:<root>``, small synthetic images with one box each.

The root folder holds ``classes.txt`` (one class name a line); every image is a dark square
canvas with one bright rectangle, its box, at a place fixed by the split and the image's index.
Options: ``n`` (images per split, default 12) and ``side`` (pixels, default 32).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import epviz.data
from epviz.data import DatasetSpec

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


class ToyImages(torch.utils.data.Dataset):
    """Synthetic images of one split, one box per image.

    Args:
        root: The folder the classes were read from.
        split: "train", "val" or "test".
        classes: Class names.
        n: Number of images.
        side: Side of the square images in pixels.
    """

    has_boxes = True

    def __init__(self, root: Path, split: str, classes: Sequence[str], n: int, side: int) -> None:
        self.root, self.split, self.classes, self.n, self.side = Path(root), split, list(classes), int(n), int(side)
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        extent = rng.integers(side // 4, side // 2 + 1, (n, 2))
        corner = (rng.random((n, 2)) * (side - extent + 1)).astype(np.int64)
        self.boxes = np.concatenate([corner, corner + extent], axis=1).astype(np.float64)
        self.labels = np.arange(n, dtype=np.int64) % len(self.classes)
        self.index = np.arange(n)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Side of the square images."""
        return self.side

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.full((3, self.side, self.side), 0.1)
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        image[:, y0:y1, x0:x1] = 0.9
        return image, int(self.labels[i])

    def box_list(self, i: int) -> np.ndarray:
        """The one box of image `i`, (1, 4) xyxy pixels, exclusive x1, y1."""
        return self.boxes[i : i + 1].copy()

    def display_image(self, i: int) -> np.ndarray:
        """Image `i` as uint8 (side, side, 3)."""
        return epviz.data.to_display(self[i][0])

    def subset(self, indices) -> ToyImages:
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        other = object.__new__(ToyImages)
        other.__dict__.update(self.__dict__)
        other.boxes, other.labels, other.index = self.boxes[indices], self.labels[indices], self.index[indices]
        return other

    def fingerprint(self) -> dict:
        """Root, split, generation parameters and the chosen images."""
        chosen = zlib.crc32(self.index.astype(np.int64).tobytes())
        return {
            "dataset": "toy",
            "root": str(self.root.resolve()),
            "split": self.split,
            "n": self.n,
            "side": self.side,
            "classes": self.classes,
            "images": chosen,
            "size": len(self),
        }


@epviz.data.register_dataset("toy", options={"n": int, "side": int})
def toy_split(spec: DatasetSpec, split: str) -> ToyImages:
    """One split of the toy dataset: classes from ``<root>/classes.txt``."""
    names = spec.folder / "classes.txt"
    if not names.is_file():
        raise FileNotFoundError(f"the toy dataset needs {names}, one class name a line")
    classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    return ToyImages(spec.folder, split, classes, spec.options.get("n", 12), spec.options.get("side", 32))
