"""Cluttered Fashion-MNIST: the embedded offline dataset.

Each 64x64 RGB canvas holds one Fashion-MNIST item at a random scale and position,
over a random crop of a natural photo or texture turned grey and compressed into a
low intensity range, so that the (bright, sometimes tinted) item stays the salient
object without the background being trivially plain. At most one small, dim fragment
of another item is added as a distractor. Every canvas carries its label, the item's
pixel mask and the exact box around that mask.

Definitions (ours):
    * mask: the canvas pixels where the resampled item's alpha is at least 0.5
      (item intensity above ``mask_threshold``); the box is the tightest box around
      the mask, in pixel units, ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``.
    * train canvases draw items (main and distractor) only from the Fashion-MNIST train
      split, test canvases only from the test split; backgrounds are shared.

Generation is batched with ``grid_sample`` and fully determined by the seed.

The canvases are the dataset kind ``cluttered-fashion-mnist`` (no folder): its standard
``train`` split holds canvases of the Fashion-MNIST train items (seed ``seed``), ``val`` other
canvases of the same items (seed ``seed + 1``), ``test`` canvases of the test items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from epviz.data.backgrounds import BACKGROUND_NAMES, background_bank
from epviz.data.fashion_mnist import CLASSES, load_fashion_mnist
from epviz.data.registry import DatasetSpec, register_dataset

__all__ = [
    "CanvasRecipe",
    "Canvases",
    "CanvasGenerator",
    "ClutteredFashionMNIST",
    "GENERATOR_VERSION",
    "STANDARD_SIZES",
    "canvases_split",
]

GENERATOR_VERSION = 1
_SPLIT_SALT = {"train": 0x5EED0, "test": 0x7E570}
STANDARD_SIZES = {"train": 20_000, "val": 2_000, "test": 4_000}
_SOURCES = {"train": ("train", 0), "val": ("train", 1), "test": ("test", 0)}  # standard split -> (item split, seed offset)


@dataclass(frozen=True)
class CanvasRecipe:
    """Every knob of canvas generation (all part of a dataset's fingerprint)."""

    image_size: int = 64
    item_size: tuple[int, int] = (24, 48)
    background_low: tuple[float, float] = (0.0, 0.12)
    background_span: tuple[float, float] = (0.15, 0.30)
    background_crop: tuple[float, float] = (0.3, 0.8)
    item_gain: tuple[float, float] = (0.75, 1.0)
    item_floor: float = 0.45
    tint_probability: float = 0.5
    tint_strength: float = 0.4
    distractor_probability: float = 0.5
    distractor_size: tuple[int, int] = (6, 12)
    distractor_gain: tuple[float, float] = (0.25, 0.4)
    mask_threshold: float = 0.125

    def __post_init__(self) -> None:
        lo, hi = self.item_size
        if not 4 <= lo <= hi <= self.image_size:
            raise ValueError(f"item_size {self.item_size} must satisfy 4 <= min <= max <= image_size ({self.image_size})")

    @classmethod
    def salience(cls, level: int) -> CanvasRecipe:
        """The standard recipe (level 0) or one where brightness says less about where the item is.

        Level 1: the background's range reaches into the item's (background up to 0.55, items from
        0.45) and every canvas has a distractor as bright as an item. Level 2: the ranges overlap
        fully (background up to 0.75, items from 0.35) and the distractors are larger (10-20 px).
        """
        if level == 0:
            return cls()
        if level == 1:
            return cls(background_low=(0.05, 0.25), background_span=(0.2, 0.3), item_gain=(0.55, 1.0), item_floor=0.45,
                       distractor_probability=1.0, distractor_gain=(0.55, 1.0))  # fmt: skip
        if level == 2:
            return cls(background_low=(0.1, 0.35), background_span=(0.25, 0.4), item_gain=(0.45, 0.9), item_floor=0.4,
                       distractor_probability=1.0, distractor_size=(10, 20), distractor_gain=(0.45, 0.9))  # fmt: skip
        raise ValueError(f"salience level must be 0, 1 or 2, got {level}")


@dataclass
class Canvases:
    """A batch of canvases.

    Attributes:
        images: uint8 (n, 3, S, S).
        labels: int64 (n,).
        boxes: float32 (n, 4), (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
        masks: bool (n, S, S).
        items: int64 (n,), index of the main item in its Fashion-MNIST split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    items: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        """Side of the square canvases in pixels."""
        return int(self.images.shape[-1])


def _uniform(gen: torch.Generator, n: int, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _place(
    items: torch.Tensor, size: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, flip: torch.Tensor, canvas: int
) -> torch.Tensor:
    """Resample items (n, 1, 28, 28) onto (n, 1, canvas, canvas) at integer boxes of side `size`."""
    coords = torch.arange(canvas, dtype=torch.float32) + 0.5
    s = size.float()[:, None]
    gx = 2 * (coords[None] - x0.float()[:, None]) / s - 1
    gy = 2 * (coords[None] - y0.float()[:, None]) / s - 1
    gx = torch.where(flip[:, None], -gx, gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(items, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) boxes, x1/y1 exclusive, of (n, S, S) bool masks."""
    size = masks.shape[-1]
    cols, rows = masks.any(dim=1), masks.any(dim=2)
    ar = torch.arange(size)
    x0 = torch.where(cols, ar, size).amin(dim=1)
    x1 = torch.where(cols, ar, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ar, size).amin(dim=1)
    y1 = torch.where(rows, ar, -1).amax(dim=1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


class CanvasGenerator:
    """Draws cluttered canvases from one Fashion-MNIST split.

    Args:
        split: "train" or "test": the only split whose items appear on the canvases.
        recipe: Generation parameters.
    """

    def __init__(self, split: str, recipe: CanvasRecipe | None = None) -> None:
        self.split = split
        self.recipe = recipe or CanvasRecipe()
        images, labels = load_fashion_mnist(split)
        self.items = torch.from_numpy(np.array(images)).float().div_(255.0)[:, None]
        self.item_labels = torch.from_numpy(labels)
        self.bank = background_bank()

    @property
    def num_items(self) -> int:
        """Number of Fashion-MNIST items in the split."""
        return int(self.items.shape[0])

    def draw(self, item_index: torch.Tensor, generator: torch.Generator, chunk: int = 512) -> Canvases:
        """Canvases showing the given items, with everything else drawn from `generator`.

        Args:
            item_index: (n,) indices into the split, one main item per canvas.
            generator: The randomness; the same state gives the same canvases.
            chunk: Canvases composited at once (memory bound only; results do not depend on it).
        """
        r, n, S = self.recipe, int(item_index.shape[0]), self.recipe.image_size
        g = generator
        # every random number is drawn up front, so chunking cannot change the result
        size = torch.randint(r.item_size[0], r.item_size[1] + 1, (n,), generator=g)
        x0 = (torch.rand(n, generator=g) * (S - size + 1)).long()
        y0 = (torch.rand(n, generator=g) * (S - size + 1)).long()
        flip = torch.rand(n, generator=g) < 0.5
        bg_index = torch.randint(len(self.bank), (n,), generator=g)
        crop = _uniform(g, n, r.background_crop)
        bg_tx = (2 * torch.rand(n, generator=g) - 1) * (1 - crop)
        bg_ty = (2 * torch.rand(n, generator=g) - 1) * (1 - crop)
        bg_flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        bg_low, bg_span = _uniform(g, n, r.background_low), _uniform(g, n, r.background_span)
        gain = _uniform(g, n, r.item_gain)
        tinted = torch.rand(n, generator=g) < r.tint_probability
        hue = torch.rand(n, 3, generator=g)
        hue = hue / hue.amax(dim=1, keepdim=True)
        colour = gain[:, None] * torch.where(tinted[:, None], 1 - r.tint_strength + r.tint_strength * hue, torch.ones(n, 3))
        has_distractor = torch.rand(n, generator=g) < r.distractor_probability
        d_item = torch.randint(self.num_items, (n,), generator=g)
        d_size = torch.randint(r.item_size[0], r.item_size[1] + 1, (n,), generator=g)
        d_x0 = (torch.rand(n, generator=g) * (S - d_size + 1)).long()
        d_y0 = (torch.rand(n, generator=g) * (S - d_size + 1)).long()
        d_win = torch.randint(r.distractor_size[0], r.distractor_size[1] + 1, (n,), generator=g)
        d_wx = d_x0 + (torch.rand(n, generator=g) * (d_size - d_win + 1)).long()
        d_wy = d_y0 + (torch.rand(n, generator=g) * (d_size - d_win + 1)).long()
        d_gain = _uniform(g, n, r.distractor_gain)

        images, masks = [], []
        ar = torch.arange(S)
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            m = int(item_index[sl].shape[0])
            theta = torch.zeros(m, 2, 3)
            theta[:, 0, 0] = crop[sl] * bg_flip[sl]
            theta[:, 1, 1] = crop[sl]
            theta[:, 0, 2] = bg_tx[sl]
            theta[:, 1, 2] = bg_ty[sl]
            grid = F.affine_grid(theta, [m, 1, S, S], align_corners=False)
            bg = F.grid_sample(self.bank[bg_index[sl]], grid, mode="bilinear", align_corners=False)
            canvas = (bg_low[sl, None, None, None] + bg_span[sl, None, None, None] * bg).expand(m, 3, S, S)

            dv = _place(self.items[d_item[sl]], d_size[sl], d_x0[sl], d_y0[sl], torch.zeros(m, dtype=torch.bool), S)
            window = ((ar[None, :] >= d_wx[sl, None]) & (ar[None, :] < (d_wx + d_win)[sl, None]))[:, None, :] & (
                (ar[None, :] >= d_wy[sl, None]) & (ar[None, :] < (d_wy + d_win)[sl, None])
            )[:, :, None]
            d_alpha = (dv * 4).clamp(0, 1) * (window & has_distractor[sl, None, None])[:, None].float()
            d_value = d_gain[sl, None, None, None] * (r.item_floor + (1 - r.item_floor) * dv)
            canvas = canvas * (1 - d_alpha) + d_value * d_alpha

            iv = _place(self.items[item_index[sl]], size[sl], x0[sl], y0[sl], flip[sl], S)
            alpha = (iv * (0.5 / r.mask_threshold)).clamp(0, 1)
            value = colour[sl, :, None, None] * (r.item_floor + (1 - r.item_floor) * iv)
            canvas = canvas * (1 - alpha) + value * alpha
            images.append(canvas.clamp(0, 1).mul(255).round().to(torch.uint8))
            masks.append(alpha[:, 0] >= 0.5)
        mask = torch.cat(masks) if masks else torch.zeros(0, S, S, dtype=torch.bool)
        return Canvases(
            images=torch.cat(images) if images else torch.zeros(0, 3, S, S, dtype=torch.uint8),
            labels=self.item_labels[item_index].clone(),
            boxes=_boxes_from_masks(mask),
            masks=mask,
            items=item_index.clone(),
        )

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Canvases]:
        """Fresh canvases showing every item of the split once, in random order, in batches."""
        order = torch.randperm(self.num_items, generator=generator)
        for s in range(0, self.num_items, batch_size):
            yield self.draw(order[s : s + batch_size], generator)


class ClutteredFashionMNIST(torch.utils.data.Dataset):
    """A fixed, reproducible set of cluttered canvases (the embedded default dataset).

    Args:
        split: "train" or "test" (which Fashion-MNIST split the items come from).
        size: Number of canvases; items are not repeated until the split is exhausted.
        seed: Seed of everything random.
        recipe: Generation parameters.
    """

    classes = CLASSES
    has_boxes = True
    has_masks = True

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, recipe: CanvasRecipe | None = None) -> None:
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if size < 1:
            raise ValueError(f"size must be a positive number of canvases, got {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        gen = CanvasGenerator(split, recipe)
        self.recipe = gen.recipe
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + _SPLIT_SALT[split])
        reps = -(-self.size // gen.num_items)
        order = torch.cat([torch.randperm(gen.num_items, generator=rng) for _ in range(reps)])[: self.size]
        canv = gen.draw(order, rng)
        self.images, self.labels, self.boxes, self.masks, self.items = (
            canv.images,
            canv.labels,
            canv.boxes,
            canv.masks,
            canv.items,
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255.0, int(self.labels[index])

    @property
    def image_size(self) -> int:
        """Side of the square canvases in pixels."""
        return self.recipe.image_size

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return len(self.classes)

    def image_batch(self, index: np.ndarray | slice) -> torch.Tensor:
        """Images at `index` as float (n, 3, S, S) in [0, 1] (fast path for extraction)."""
        return self.images[index].float() / 255.0

    def box_list(self, index: int) -> np.ndarray:
        """The ground-truth boxes of one image, (k, 4) xyxy pixels (k == 1 here)."""
        return self.boxes[index : index + 1].numpy()

    def mask(self, index: int) -> torch.Tensor:
        """The item's pixel mask on canvas `index`, bool (S, S)."""
        return self.masks[index]

    def display_image(self, index: int) -> np.ndarray:
        """Canvas `index` as uint8 (S, S, 3)."""
        return self.images[index].permute(1, 2, 0).numpy()

    def fingerprint(self) -> dict:
        """Everything that determines the images (used in token-cache keys)."""
        recipe = json.dumps(dataclasses.asdict(self.recipe), sort_keys=True)
        return {
            "dataset": "cluttered-fashion-mnist",
            "version": GENERATOR_VERSION,
            "split": self.split,
            "size": self.size,
            "seed": self.seed,
            "recipe": hashlib.sha256(recipe.encode()).hexdigest()[:16],
            "backgrounds": len(BACKGROUND_NAMES),
        }


@register_dataset("cluttered-fashion-mnist", needs_root=False, draws=True, options={"salience": int})
def canvases_split(spec: DatasetSpec, split: str, *, size: int | None = None, seed: int = 0) -> ClutteredFashionMNIST:
    """One standard split of the canvases (see the module docstring).

    Args:
        spec: The parsed spec; option ``salience`` (0, 1 or 2, :meth:`CanvasRecipe.salience`) makes
            brightness a weaker cue to where the item is (``cluttered-fashion-mnist?salience=2``).
        split: "train", "val" or "test".
        size: Number of canvases (None: :data:`STANDARD_SIZES`).
        seed: Seed of the train and test canvases; val uses ``seed + 1``.
    """
    source, offset = _SOURCES[split]
    recipe = CanvasRecipe.salience(int(spec.options.get("salience", 0)))
    return ClutteredFashionMNIST(source, STANDARD_SIZES[split] if size is None else int(size), seed=seed + offset, recipe=recipe)
