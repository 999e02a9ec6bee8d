"""Seeded augmented views of training images: RandomResizedCrop + horizontal flip.

A view is named by (seed, image index, view number) alone: :func:`view_params` seeds its
own ``torch.Generator`` from those three numbers, so view ``v`` of image ``i`` is the same
crop and flip whatever the batch it falls in, the process rank, the world size or the
order of extraction. :func:`apply_view` cuts, resizes and flips a batch;
:func:`augmented_batch` does both for a batch of consecutive dataset images.

See :data:`VIEW_PROTOCOL` for how the stored views are used in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from epviz.checks import check_int
from epviz.errors import ConfigError, DataError

__all__ = ["VIEW_PROTOCOL", "ViewParams", "apply_view", "augmented_batch", "view_generator", "view_params"]

VIEW_PROTOCOL = """\
Stored views: the protocol between "cached, no augmentation" and "per-step augmentation".
The backbone runs once per stored view: each training image is extracted K times, as K
seeded views (RandomResizedCrop + horizontal flip, see epviz.tokens.views), and the cache holds
the K token sets per image (image-major: row i*K + v is view v of image i). Each epoch the
probe sees one view per image, drawn uniformly from the K by a deterministic function of
(seed, epoch, image) (TokenSet.for_epoch). The cost is K backbone passes over the training set
instead of one (cached) or one per epoch (per-step); the augmentation diversity is K views per
image instead of none or a fresh one every step. Evaluation reads un-augmented tokens.
"""

_TRIES = 10  # area/aspect draws before the central-crop fallback


@dataclass(frozen=True)
class ViewParams:
    """One view of an image: the crop box (in pixels) and whether to flip it.

    Attributes:
        top: First row of the crop.
        left: First column of the crop.
        h: Crop height.
        w: Crop width.
        flip: Mirror the crop left-right.
    """

    top: int
    left: int
    h: int
    w: int
    flip: bool


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        lo, hi = math.nan, math.nan
    if not (0 < lo <= hi < math.inf):
        raise ConfigError(f"{name} must be (low, high) with 0 < low <= high, got {value!r}")
    return lo, hi


def view_generator(image_index: int, view: int, seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, image_index, view) only.

    The three numbers are mixed by numpy's ``SeedSequence``, so neighbouring images, views or
    seeds get unrelated streams.

    Raises:
        ConfigError: A negative or non-integer argument.
    """
    words = [check_int(name, v, 0) for name, v in (("seed", seed), ("image_index", image_index), ("view", view))]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))  # < 2**63
    return generator


def view_params(
    image_index: int,
    view: int,
    seed: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> ViewParams:
    """The crop and flip of view `view` of image `image_index` (RandomResizedCrop's sampling).

    Up to ten times, draw a crop area uniform in ``scale`` times the image area and an aspect
    ratio (w / h) log-uniform in ``ratio``; the first box that fits in the image is placed
    uniformly at random. When none fits, the crop is the largest central box whose aspect lies in
    ``ratio``. Last, the flip is drawn with probability 1/2. Every draw comes from
    :func:`view_generator`, in the same order and from the same distributions as torchvision's
    ``RandomResizedCrop.get_params`` followed by ``RandomHorizontalFlip``.

    Args:
        image_index: The image's position in the dataset.
        view: The view number (0 .. K-1).
        seed: The extraction's seed.
        height: Image height in pixels.
        width: Image width in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).

    Raises:
        ConfigError: A negative index/view/seed, a non-positive size, or a bad range.
    """
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    scale_lo, scale_hi = _check_range("scale", scale)
    ratio_lo, ratio_hi = _check_range("ratio", ratio)
    return _draw_view(view_generator(image_index, view, seed), height, width, (scale_lo, scale_hi), (ratio_lo, ratio_hi))


def _draw_view(g: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]) -> ViewParams:
    """The draws of :func:`view_params` from `g` (arguments already checked)."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    box = None
    for _ in range(_TRIES):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=g)).item()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            box = (top, left, h, w)
            break
    if box is None:
        box = _central_box(height, width, *ratio)
    flip = bool(torch.rand(1, generator=g).item() < 0.5)
    return ViewParams(*box, flip=flip)


def _central_box(height: int, width: int, ratio_lo: float, ratio_hi: float) -> tuple[int, int, int, int]:
    """The whole image, narrowed to the nearest aspect in [ratio_lo, ratio_hi], centred."""
    aspect = width / height
    h, w = height, width
    if aspect < ratio_lo:  # too tall: keep the width
        h = int(round(width / ratio_lo))
    elif aspect > ratio_hi:  # too wide: keep the height
        w = int(round(height * ratio_hi))
    return (height - h) // 2, (width - w) // 2, h, w


def _as_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        rows, cols = size
    except (TypeError, ValueError):
        raise ConfigError(f"size must be (height, width) of positive integers, got {size!r}") from None
    return check_int("size[0] (height)", rows, 1), check_int("size[1] (width)", cols, 1)


def apply_view(images: torch.Tensor, params: Sequence[ViewParams], size: Sequence[int]) -> torch.Tensor:
    """Crop, resize (bicubic, antialiased) and flip each image by its :class:`ViewParams`.

    Args:
        images: (B, C, H, W), float in [0, 1] or uint8 (read as value / 255).
        params: One ViewParams per image.
        size: Output (height, width).

    Returns:
        Float32 (B, C, *size) on the images' device.

    Raises:
        DataError: `images` is not a 4-D tensor, or a crop box leaves the image.
        ConfigError: `params` and `images` disagree in number, or `size` is bad.
    """
    if not torch.is_tensor(images) or images.ndim != 4:
        raise DataError(f"images must be a tensor (B, C, H, W); got {getattr(images, 'shape', type(images).__name__)}")
    out_size = _as_size(size)
    if len(params) != images.shape[0]:
        raise ConfigError(f"{len(params)} view params for {images.shape[0]} images; pass one ViewParams per image")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    height, width = images.shape[-2:]
    out = images.new_empty((images.shape[0], images.shape[1], *out_size))
    for b, p in enumerate(params):
        if p.h < 1 or p.w < 1 or p.top < 0 or p.left < 0 or p.top + p.h > height or p.left + p.w > width:
            raise DataError(f"view {p} of image {b} does not lie inside the {height}x{width} image; draw it with view_params")
        crop = images[b : b + 1, :, p.top : p.top + p.h, p.left : p.left + p.w]
        resized = F.interpolate(crop, size=out_size, mode="bicubic", align_corners=False, antialias=True)
        out[b] = resized[0].flip(-1) if p.flip else resized[0]
    return out


def augmented_batch(
    images: torch.Tensor,
    first_index: int,
    view: int,
    seed: int,
    size: Sequence[int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """View `view` of a batch of consecutive dataset images.

    Args:
        images: (B, C, H, W), the dataset's images first_index .. first_index + B - 1.
        first_index: Dataset position of ``images[0]``.
        view: The view number (0 .. K-1).
        seed: The extraction's seed.
        size: Output (height, width), usually the backbone's input size.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).

    Returns:
        Float32 (B, C, *size).
    """
    if not torch.is_tensor(images) or images.ndim != 4:
        raise DataError(f"images must be a tensor (B, C, H, W); got {getattr(images, 'shape', type(images).__name__)}")
    first_index = check_int("first_index", first_index, 0)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    params = [view_params(first_index + b, view, seed, height, width, scale, ratio) for b in range(images.shape[0])]
    return apply_view(images, params, size)
