"""A dataset of image files with labels and, where the dataset has them, boxes and masks.

The format loaders (:mod:`epviz.data.imagenet`, :mod:`epviz.data.cub`,
:mod:`epviz.data.pets`, ImageFolder) parse their annotation files into a list of
:class:`Sample` and hand it to :class:`AnnotatedImages`, which applies the evaluation
transform to images, boxes and masks alike (:class:`~epviz.data.transforms.EvalTransform`).

Boxes are stored in the original image's pixels, ``(x0, y0, x1, y1)`` with exclusive
``x1, y1``. A box reaching more than :data:`BOX_TOLERANCE` pixels beyond its image is an
error (the annotation does not belong to the image); within the tolerance it is clipped.
A box that the center crop removes entirely is reported by :meth:`AnnotatedImages.cropped_away`
and by a warning, and left out of :meth:`AnnotatedImages.box_list`.

An annotation that states its image's size (``Sample.size``, e.g. VOC ``<size>``) is checked
against the image file's header by every accessor, images and boxes alike: a mismatch is an
:class:`~epviz.errors.AnnotationError`, never boxes in the wrong frame. Images are decoded
with the size limits of :mod:`epviz.data.images` (a huge image is decoded at a reduced scale
fitting the transform; its boxes and mask are scaled along).

:meth:`AnnotatedImages.check` reads one image and its annotations as every accessor would;
:func:`epviz.data.load_split` with ``on_error="skip"`` uses it to leave unreadable images out.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from epviz.data.images import ImageFileError, read_image, read_image_size, to_display
from epviz.data.transforms import EvalTransform, min_side
from epviz.errors import AnnotationError, DataError

__all__ = ["AnnotationError", "Sample", "AnnotatedImages", "BOX_TOLERANCE"]

BOX_TOLERANCE = 1.0


@dataclass(frozen=True)
class Sample:
    """One image and its annotations.

    Attributes:
        path: The image file.
        label: Class index.
        boxes: float (k, 4) boxes in original pixels (exclusive x1, y1), or None without boxes.
        mask_path: A mask file (read by the dataset's mask reader), or None.
        size: (width, height) stated by the annotation, checked against the image; None if unknown.
        source: The annotation file or record the boxes came from (for error messages).
    """

    path: Path
    label: int
    boxes: np.ndarray | None = None
    mask_path: Path | None = None
    size: tuple[int, int] | None = None
    source: str | None = None


class AnnotatedImages(torch.utils.data.Dataset):
    """Image files with labels, optional boxes and masks, under the evaluation transform.

    ``dataset[i]`` is ``(image float (3, crop, crop) in [0, 1], label)``, which is what
    :func:`epviz.extract_tokens` reads; :meth:`box_list` and :meth:`mask` give the
    annotations in the same (transformed) pixel frame.

    Args:
        name: Dataset name ("imagenet", "cub", ...), used in fingerprints and cache names.
        split: Which split the samples are.
        samples: The samples, in a fixed order.
        classes: Class names; label i is ``classes[i]``.
        root: The dataset's root folder.
        transform: The evaluation transform (default: Resize 256 + CenterCrop 224, bicubic),
            or any callable on (3, H, W) image tensors (e.g. the per-step training augmentation).
        has_boxes: Whether the dataset has box annotations.
        mask_reader: Reads ``Sample.mask_path`` into a bool (H, W) array; None without masks.
        boxes_from_masks: Derive each image's single box from its mask (tight box).
    """

    def __init__(
        self,
        name: str,
        split: str,
        samples: Sequence[Sample],
        classes: Sequence[str],
        root: str | Path,
        transform: Callable | None = None,
        *,
        has_boxes: bool = False,
        mask_reader: Callable[[Path], np.ndarray] | None = None,
        boxes_from_masks: bool = False,
    ) -> None:
        self.name, self.split, self.root = str(name), str(split), Path(root)
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = EvalTransform() if transform is None else transform
        self.has_boxes = bool(has_boxes or boxes_from_masks)
        self.mask_reader, self.boxes_from_masks = mask_reader, bool(boxes_from_masks)
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise AnnotationError(
                f"{name} {split}: labels range {self.labels.min()}..{self.labels.max()} but there are {len(self.classes)} classes"
            )
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._warned = False
        self.skipped: list = []
        self.standard_split: str | None = None  # which standard split (train / val / test) these images are, when known

    # --- the dataset protocol ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image, _ = self._image(sample)
        if isinstance(self.transform, EvalTransform):
            image = self.transform(image).image
        else:
            image = self.transform(image)
        return image, int(sample.label)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Side of the (square) transformed images in pixels."""
        return int(getattr(self.transform, "crop", 0)) or int(self[0][0].shape[-1])

    def display_image(self, index: int) -> np.ndarray:
        """Image `index` under the dataset's transform, uint8 (crop, crop, 3): the frame of :meth:`box_list`."""
        return to_display(self[index][0])

    @property
    def has_masks(self) -> bool:
        """Whether the images have masks."""
        return self.mask_reader is not None

    # --- annotations --------------------------------------------------------------------

    def box_list(self, index: int) -> np.ndarray:
        """The boxes of image `index` that are inside the crop, (k, 4) crop pixels, exclusive x1, y1.

        Raises:
            AnnotationError: The dataset has no boxes, or a box does not fit its image.
        """
        boxes, visible = self._transformed_boxes(index)
        return boxes[visible].astype(np.float64)

    def cropped_away(self, index: Sequence[int] | None = None) -> pd.DataFrame:
        """Boxes the center crop removed entirely: one row per box (index, file, box in original pixels).

        Args:
            index: Images to check (default: all; reads each image's header or mask once).
        """
        rows = []
        for i in range(len(self)) if index is None else index:
            _, visible = self._transformed_boxes(int(i))
            raw = self._raw_boxes(int(i))[0]
            for k in np.flatnonzero(~visible):
                rows.append(
                    {
                        "index": int(i),
                        "file": str(self.samples[i].path),
                        "box": [float(v) for v in raw[k]],
                        "boxes_left": int(visible.sum()),
                    }
                )
        return pd.DataFrame(rows, columns=["index", "file", "box", "boxes_left"])

    def mask(self, index: int) -> torch.Tensor:
        """The transformed mask of image `index`, bool (crop, crop)."""
        if self.mask_reader is None:
            raise AnnotationError(f"{self.name} has no masks")
        if not isinstance(self.transform, EvalTransform):
            raise AnnotationError("masks are only aligned with the evaluation transform; use dataset.with_transform(None)")
        sample = self.samples[index]
        image, hw = self._image(sample)
        mask = self.transform(image, mask=_fit_mask(self._mask(sample, hw), image)).mask
        assert mask is not None  # the transform hands back the mask it was given
        return mask

    def sample(self, index: int) -> dict:
        """Everything about image `index` under the evaluation transform: image, label, boxes, visible, mask, file."""
        if not isinstance(self.transform, EvalTransform):
            raise AnnotationError("annotations are only aligned with the evaluation transform; use dataset.with_transform(None)")
        s = self.samples[index]
        image, hw = self._image(s)
        raw = self._raw_boxes(index, image_size=hw)[0] if self.has_boxes else None
        mask = _fit_mask(self._mask(s, hw), image) if self.mask_reader is not None else None
        if raw is not None and tuple(image.shape[-2:]) != hw:  # decoded at a reduced scale: boxes follow
            (h, w), (dh, dw) = hw, image.shape[-2:]
            raw = raw * np.array([dw / w, dh / h, dw / w, dh / h])
        out = self.transform(image, raw, mask)
        return {
            "image": out.image,
            "label": int(s.label),
            "boxes": out.boxes[out.visible],
            "visible": out.visible,
            "mask": out.mask,
            "file": str(s.path),
        }

    def check(self, index: int) -> None:
        """Read image `index` and its annotations as every accessor would, and discard them.

        Raises:
            DataError: What reading the image would raise: :class:`~epviz.data.images.ImageFileError`
                (missing, corrupt, too large) or :class:`~epviz.errors.AnnotationError` (a box, size
                or mask that does not fit the image).
        """
        sample = self.samples[index]
        _, hw = self._image(sample)
        if self.mask_reader is not None:
            self._mask(sample, hw)
        if self.has_boxes:
            self._raw_boxes(index, image_size=hw)

    # --- derived datasets ---------------------------------------------------------------

    def subset(self, indices: Sequence[int] | np.ndarray) -> AnnotatedImages:
        """The same dataset restricted to `indices` (in that order)."""
        other = copy.copy(self)
        other.samples = [self.samples[int(i)] for i in indices]
        other.labels = self.labels[np.asarray(indices, dtype=np.int64)] if len(indices) else self.labels[:0]
        other._boxes, other._warned = {}, False
        return other

    def with_transform(self, transform: Callable | None) -> AnnotatedImages:
        """The same images under another transform (None: the default evaluation transform)."""
        other = copy.copy(self)
        other.transform = EvalTransform() if transform is None else transform
        other._boxes, other._warned = {}, False
        return other

    def fingerprint(self) -> dict:
        """Files (names, sizes, mtimes), labels and transform (token-cache key)."""
        digest = hashlib.sha256()
        for s in self.samples:
            st = s.path.stat()
            digest.update(f"{s.path}|{s.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        describe = getattr(self.transform, "describe", None)
        return {
            "dataset": f"{self.name}-{self.split}",
            "root": str(self.root.resolve()),
            "files": digest.hexdigest()[:20],
            "size": len(self),
            "transform": describe() if describe else repr(self.transform),
        }

    def __repr__(self) -> str:
        extra = (", boxes" if self.has_boxes else "") + (", masks" if self.has_masks else "")
        return f"AnnotatedImages({self.name} {self.split}: {len(self)} images, {self.num_classes} classes{extra})"

    # --- internals ------------------------------------------------------------------------

    def _image(self, sample: Sample) -> tuple[torch.Tensor, tuple[int, int]]:
        """The decoded image (possibly at a reduced scale) and the file's own (height, width)."""
        image, (w, h) = read_image(sample.path, convert=True, min_side=min_side(self.transform))
        self._check_frame(sample, w, h)
        return image, (h, w)

    def _image_hw(self, sample: Sample) -> tuple[int, int]:
        """The file's (height, width) from its header (cheap), checked as :meth:`_image` checks it."""
        w, h = read_image_size(sample.path)
        self._check_frame(sample, w, h)
        return h, w

    def _check_frame(self, sample: Sample, w: int, h: int) -> None:
        if sample.size is not None and (w, h) != tuple(sample.size):
            raise AnnotationError(
                f"{sample.path} is {w}x{h} pixels but its annotation ({sample.source}) says "
                f"{sample.size[0]}x{sample.size[1]}: the annotation belongs to another image (or the image was resized)"
            )
        if isinstance(self.transform, EvalTransform):
            try:
                self.transform.check_size(h, w, what=str(sample.path))
            except DataError as err:
                raise ImageFileError(str(err)) from None

    def _read_mask(self, sample: Sample) -> np.ndarray:
        """The mask file of `sample`, read (called only on a dataset with masks: a reader and a mask file per image)."""
        assert self.mask_reader is not None and sample.mask_path is not None
        return np.asarray(self.mask_reader(sample.mask_path), dtype=bool)

    def _mask(self, sample: Sample, hw) -> np.ndarray:
        mask = self._read_mask(sample)
        if tuple(mask.shape) != tuple(int(v) for v in hw):
            raise AnnotationError(
                f"the mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {sample.path} is {hw[1]}x{hw[0]}"
            )
        return mask

    def _raw_boxes(self, index: int, image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        if not self.has_boxes:
            raise AnnotationError(
                f"{self.name} ({self.split}) has no box annotations, so it cannot be used for localization; "
                "use a dataset with boxes (ImageNet val with its XML/CSV boxes, CUB, Pets)"
            )
        sample = self.samples[index]
        if self.boxes_from_masks:
            mask = self._read_mask(sample)
            return _tight_box(mask, sample.mask_path), mask.shape
        h, w = image_size or self._image_hw(sample)
        boxes = np.zeros((0, 4)) if sample.boxes is None else np.asarray(sample.boxes, dtype=np.float64).reshape(-1, 4)
        for box in boxes:
            x0, y0, x1, y1 = box
            t = BOX_TOLERANCE
            if not (x1 > x0 and y1 > y0) or x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
                raise AnnotationError(
                    f"box {[float(v) for v in box]} (x0, y0, x1, y1) of {sample.path.name} (from {sample.source}) lies outside "
                    f"its {w}x{h} image or is empty; the annotation does not fit the image — fix or remove it"
                )
        return np.clip(boxes, 0, [w, h, w, h]), (h, w)

    def _transformed_boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._boxes:
            if not isinstance(self.transform, EvalTransform):
                raise AnnotationError("boxes are only aligned with the evaluation transform; use dataset.with_transform(None)")
            raw, hw = self._raw_boxes(index)
            self._boxes[index] = self.transform.boxes(raw, hw)
            visible = self._boxes[index][1]
            if not visible.all() and not self._warned:
                self._warned = True
                warnings.warn(
                    f"{(~visible).sum()} of {len(visible)} boxes of {self.samples[index].path.name} lie outside the "
                    f"{self.transform.crop}px center crop and are left out of box_list(); "
                    "dataset.cropped_away() lists every such box (this warning is shown once per dataset)",
                    stacklevel=3,
                )
        return self._boxes[index]


def _fit_mask(mask: np.ndarray, image: torch.Tensor) -> np.ndarray:
    """`mask` resized (nearest) to an image decoded at a reduced scale; unchanged otherwise."""
    hw = tuple(image.shape[-2:])
    if tuple(mask.shape) == hw:
        return mask
    resized = torch.nn.functional.interpolate(torch.as_tensor(mask, dtype=torch.uint8)[None, None], size=hw, mode="nearest")
    return resized[0, 0].bool().numpy()


def _tight_box(mask: np.ndarray, source) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise AnnotationError(f"the mask {source} marks no object pixel, so it gives no box")
    return np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=np.float64)
