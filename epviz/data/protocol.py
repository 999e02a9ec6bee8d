"""The dataset interface every stage relies on, declared as :class:`typing.Protocol` classes.

Every dataset kind opened by :func:`epviz.data.load_split` returns an :class:`ImageDataset`;
token extraction, localization and the Explorer read nothing else. The smaller protocols say
what a stage needs of an object that is not a full dataset:

* :class:`Fingerprinted`: the token cache keys tokens by ``fingerprint()``.
* :class:`ImageBatches`: a dataset that hands out a batch of images at once (the extraction
  fast path, instead of a ``DataLoader`` over ``dataset[i]``).
* :class:`GroundTruthBoxes`: the least localization needs (``boxes`` of every image and the
  ``image_size``), e.g. a stand-in holding boxes only.

Conventions: images are float (3, H, W) in [0, 1] (or uint8); boxes are float (k, 4)
``(x0, y0, x1, y1)`` pixels of the image as the dataset hands it out, with exclusive ``x1, y1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["IMAGE_DATASET_MEMBERS", "Fingerprinted", "GroundTruthBoxes", "ImageBatches", "ImageDataset", "missing_members"]


@runtime_checkable
class Fingerprinted(Protocol):
    """An object that can say what determines its images."""

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able dict of everything that determines the images (token-cache key)."""
        ...


@runtime_checkable
class ImageDataset(Fingerprinted, Protocol):
    """A labelled image dataset, optionally with ground-truth boxes.

    ``dataset[i]`` is ``(image, label)``: image float (3, H, W) in [0, 1] or uint8, label int.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    @property
    def labels(self) -> np.ndarray | torch.Tensor:
        """(n,) int64 labels (the canvases keep them as a tensor)."""
        ...

    @property
    def classes(self) -> Sequence[str]:
        """Class names; label i is ``classes[i]``."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        ...

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Side of the square images, or their (height, width), in pixels."""
        ...

    @property
    def has_boxes(self) -> bool:
        """Whether :meth:`box_list` gives ground-truth boxes."""
        ...

    def box_list(self, index: int) -> np.ndarray:
        """The ground-truth boxes of image `index`, float (k, 4) xyxy pixels, exclusive x1, y1.

        Raises:
            ValueError: The dataset has no boxes (``has_boxes`` is False).
        """
        ...

    def display_image(self, index: int) -> np.ndarray:
        """Image `index` as uint8 (H, W, 3), in the pixel frame of :meth:`box_list` (what the Explorer shows)."""
        ...


@runtime_checkable
class ImageBatches(Protocol):
    """A dataset that hands out many images at once (token extraction's fast path)."""

    @property
    def labels(self) -> np.ndarray | torch.Tensor:
        """(n,) int64 labels."""
        ...

    def image_batch(self, index: np.ndarray | slice) -> torch.Tensor:
        """Images at `index` as float (b, 3, H, W) in [0, 1]."""
        ...


@runtime_checkable
class GroundTruthBoxes(Protocol):
    """Boxes of every image and the image size: what localization reads of a stand-in dataset."""

    @property
    def boxes(self) -> Any:
        """(n, 4) array or tensor, or a per-image sequence of (k, 4) arrays, xyxy pixels, exclusive x1, y1."""
        ...

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Side of the square images, or their (height, width), in pixels."""
        ...

    def __len__(self) -> int: ...


IMAGE_DATASET_MEMBERS = (
    "__len__",
    "__getitem__",
    "labels",
    "classes",
    "num_classes",
    "image_size",
    "has_boxes",
    "box_list",
    "display_image",
    "fingerprint",
)


def missing_members(dataset: object) -> list[str]:
    """The members of :class:`ImageDataset` that `dataset` lacks (empty: it satisfies the protocol)."""
    return [name for name in IMAGE_DATASET_MEMBERS if not hasattr(dataset, name)]
