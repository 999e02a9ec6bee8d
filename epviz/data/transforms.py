"""The reference image transforms, applied to an image, its boxes and its mask together.

Evaluation (every split that is not trained on with augmentation): bicubic Resize of
the shorter side to 256 (antialiased), then CenterCrop 224, as in the reference
implementation. Boxes and masks go through the same torchvision v2 pipeline as the
image (masks with nearest-neighbour resampling), so they stay aligned with it; boxes
are then clipped to the crop. A box that lies entirely outside the crop is *reported*
(``visible`` is False for it), never silently dropped.

Training with the per-step protocol: RandomResizedCrop (scale 0.08-1, bicubic) and a
horizontal flip, drawn afresh at every step (:func:`train_transform`).

Images are float (3, H, W) tensors in [0, 1]; the backbone's own mean/std are applied
later, by the stage that runs the backbone (token extraction or the per-step trainer).
Boxes are ``(x0, y0, x1, y1)`` pixels with exclusive ``x1, y1``.

Limit: the evaluation transform refuses an image whose longer side is more than
:data:`MAX_ASPECT_RATIO` (32) times its shorter side. Resizing the shorter side to 256
stretches the longer side by the same factor, so a 1x4096 image would become a 256x1048576
float image (3 GB) for one 224x224 crop; 32:1 keeps the resized image under 30 MB and
admits every panorama. :func:`min_side` says how small an image may be decoded for a
transform (see :func:`epviz.data.images.load_image`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from epviz.errors import DataError

__all__ = ["EvalTransform", "Transformed", "train_transform", "min_side", "MAX_ASPECT_RATIO", "RESIZE", "CROP"]

RESIZE = 256
CROP = 224
MAX_ASPECT_RATIO = 32
_BICUBIC = v2.InterpolationMode.BICUBIC


@dataclass
class Transformed:
    """One image after the evaluation transform.

    Attributes:
        image: float (3, crop, crop) in [0, 1].
        boxes: float32 (k, 4) boxes in crop pixels, clipped to the crop (all k input boxes).
        visible: bool (k,): False for a box that the crop removed entirely.
        mask: bool (crop, crop) or None.
    """

    image: torch.Tensor
    boxes: np.ndarray
    visible: np.ndarray
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to `resize` (bicubic, antialiased), then center-crop `crop`.

    Args:
        resize: Shorter side after resizing (reference: 256).
        crop: Side of the square center crop (reference: 224).
    """

    resize: int = RESIZE
    crop: int = CROP

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
        if self.crop > self.resize:
            raise ValueError(
                f"crop ({self.crop}) must not exceed resize ({self.resize}): the crop is taken from the resized image"
            )

    @property
    def pipeline(self) -> v2.Compose:
        """The torchvision v2 pipeline (works on images, boxes and masks)."""
        return v2.Compose([v2.Resize(int(self.resize), interpolation=_BICUBIC, antialias=True), v2.CenterCrop(int(self.crop))])

    def describe(self) -> dict:
        """A JSON-able description (part of dataset fingerprints)."""
        return {"resize": int(self.resize), "crop": int(self.crop), "interpolation": "bicubic-antialias"}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of an image of (`height`, `width`) after the resize, before the crop (torchvision's rule)."""
        short, long = sorted((int(height), int(width)))
        new_long = int(self.resize * long / max(short, 1))
        return (self.resize, new_long) if height <= width else (new_long, self.resize)

    def check_size(self, height: int, width: int, what: str = "the image") -> None:
        """Refuse an image whose aspect ratio exceeds :data:`MAX_ASPECT_RATIO` (see the module docstring).

        Raises:
            DataError: The resized image would be that many times longer than wide.
        """
        short, long = sorted((int(height), int(width)))
        if long > MAX_ASPECT_RATIO * max(short, 1):
            rh, rw = self.resized_size(height, width)
            raise DataError(
                f"{what} is {width}x{height} pixels, an aspect ratio of {long / max(short, 1):.0f}:1, beyond the "
                f"{MAX_ASPECT_RATIO}:1 the evaluation transform accepts (epviz.data.transforms.MAX_ASPECT_RATIO): resizing its "
                f"shorter side to {self.resize} would make a {rw}x{rh} image ({3 * 4 * rh * rw / 1e9:.1f} GB of floats) for one "
                f"{self.crop}x{self.crop} crop; crop the file or leave it out (load_split(..., on_error='skip'))"
            )

    def boxes(self, boxes: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of an image of `image_size` (height, width), in crop pixels.

        Returns:
            float32 (k, 4) boxes clipped to the crop, and bool (k,) ``visible``: False
            where nothing of the box is left inside the crop.
        """
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(b) == 0:
            return b, np.zeros(0, dtype=bool)
        h, w = (int(s) for s in image_size)
        out = self.pipeline(tv_tensors.BoundingBoxes(torch.from_numpy(b), format="XYXY", canvas_size=(h, w)))
        return _clip(out.as_subclass(torch.Tensor).numpy(), self.crop)

    def __call__(
        self, image: torch.Tensor, boxes: np.ndarray | None = None, mask: torch.Tensor | np.ndarray | None = None
    ) -> Transformed:
        """Transform an image (float (3, H, W) in [0, 1]) with its boxes and mask (H, W)."""
        if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"the evaluation transform needs an RGB image tensor (3, H, W); got {getattr(image, 'shape', type(image))}"
            )
        h, w = image.shape[-2:]
        self.check_size(h, w)
        inputs: list = [tv_tensors.Image(image)]
        b = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        inputs.append(tv_tensors.BoundingBoxes(torch.from_numpy(b), format="XYXY", canvas_size=(h, w)))
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask)).to(torch.uint8)
            if tuple(m.shape) != (h, w):
                raise ValueError(f"the mask is {tuple(m.shape)} but the image is ({h}, {w}); they must be the same size")
            inputs.append(tv_tensors.Mask(m[None]))
        out = self.pipeline(*inputs)
        new_boxes, visible = _clip(out[1].as_subclass(torch.Tensor).numpy(), self.crop)
        new_mask = out[2].as_subclass(torch.Tensor)[0].bool() if mask is not None else None
        return Transformed(image=out[0].as_subclass(torch.Tensor).clamp(0, 1), boxes=new_boxes, visible=visible, mask=new_mask)


def _clip(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, size)
    visible = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b, visible


def min_side(transform) -> int | None:
    """The shorter side, in pixels, that `transform` needs of its input image (None: unknown).

    The evaluation transform needs its ``resize``; a ``RandomResizedCrop(size, scale)`` needs
    ``size / sqrt(min scale)`` (its smallest crop must still hold ``size`` pixels); a ``Resize``
    its size. Image loaders decode a much larger image at a reduced scale, down to
    :data:`~epviz.data.images.OVERSAMPLE` times this side.
    """
    if isinstance(transform, EvalTransform):
        return int(transform.resize)
    steps = getattr(transform, "transforms", [transform])
    sides = []
    for step in steps:
        if isinstance(step, v2.RandomResizedCrop):
            sides.append(int(np.ceil(max(step.size) / np.sqrt(min(step.scale)))))
        elif isinstance(step, v2.Resize) and step.size is not None:
            sides.append(int(max(step.size if isinstance(step.size, (list, tuple)) else [step.size])))
    return max(sides) if sides else None


def train_transform(crop: int = CROP, scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """RandomResizedCrop(`crop`, `scale`, bicubic) + horizontal flip: the per-step augmentation.

    Args:
        crop: Output side in pixels.
        scale: Range of the crop's area as a fraction of the image.
    """
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    return v2.Compose(
        [
            v2.RandomResizedCrop(int(crop), scale=(float(lo), float(hi)), interpolation=_BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
