"""Natural photos and textures shipped with scikit-image, scikit-learn and matplotlib.

They are the backgrounds of the cluttered canvases: converted to grey and resized to a
common square size so that random crops can be drawn in one batched operation.
"""

from __future__ import annotations

import functools
from typing import IO, cast

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BACKGROUND_NAMES", "background_bank"]

_SKIMAGE = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "page",
    "rocket",
    "text",
    "horse",
    "immunohistochemistry",
)
BACKGROUND_NAMES = tuple(f"skimage:{n}" for n in _SKIMAGE) + (
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
)


def _load(name: str) -> np.ndarray:
    source, item = name.split(":", 1)
    if source == "skimage":
        import skimage.data

        img = getattr(skimage.data, item)()
    elif source == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(item)
    else:
        import matplotlib.cbook
        from PIL import Image

        # an image file: get_sample_data hands out an ndarray only for .npy files
        with cast(IO[bytes], matplotlib.cbook.get_sample_data(item)) as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    img = np.asarray(img, dtype=np.float32)
    if img.dtype == bool or img.max() <= 1.0:
        img = img * 255.0
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return img / 255.0


@functools.lru_cache(maxsize=4)
def background_bank(size: int = 192) -> torch.Tensor:
    """All backgrounds as grey (K, 1, size, size) float tensor in [0, 1] (centre square crops)."""
    out = []
    for name in BACKGROUND_NAMES:
        img = _load(name)
        h, w = img.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = torch.from_numpy(np.ascontiguousarray(img[top : top + s, left : left + s]))[None, None]
        out.append(F.interpolate(square, size=(size, size), mode="area")[0])
    return torch.stack(out)
