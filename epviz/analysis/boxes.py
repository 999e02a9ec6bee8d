"""Ground-truth boxes and masks of a dataset, by image: what every localization measure reads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from epviz.data import GroundTruthBoxes, ImageDataset

__all__ = ["box_source", "mask_source"]


def box_source(dataset) -> Callable[[int], np.ndarray]:
    """A function image index -> that image's GT boxes (k, 4).

    Args:
        dataset: An :class:`~epviz.data.ImageDataset` with boxes (its ``box_list``), a
            :class:`~epviz.data.GroundTruthBoxes` stand-in (its ``boxes``: an (n, 4) array or
            tensor, or a per-image sequence of (k, 4) arrays), or the boxes themselves.

    Raises:
        ValueError: The dataset has no boxes.
    """
    if isinstance(dataset, ImageDataset):
        if not dataset.has_boxes:
            raise ValueError(
                f"localization needs GT boxes, but {dataset!r} has no box annotations (has_boxes is False); "
                "use a dataset with boxes (the canvases, ImageNet val with its XML/CSV boxes, CUB, Pets)"
            )
        return dataset.box_list
    if isinstance(dataset, GroundTruthBoxes):
        boxes = dataset.boxes
    elif isinstance(dataset, (np.ndarray, torch.Tensor, list, tuple)):
        boxes = dataset
    else:
        raise ValueError(
            f"localization needs GT boxes: a `boxes` attribute ((n, 4) xyxy pixels, or one (k, 4) array per image) "
            f"with an `image_size`, or a dataset with boxes (epviz.data.ImageDataset); {type(dataset).__name__} is neither"
        )
    return lambda i: boxes[i]


def mask_source(dataset) -> Callable[[int], np.ndarray] | None:
    """A function image index -> that image's object mask, bool (H, W); None when the dataset has no masks.

    Datasets declare masks with ``has_masks`` and give them with ``mask(index)`` (the canvases,
    Pets, and :class:`~epviz.data.GroundTruthBoxes` stand-ins with a ``masks`` attribute).
    """
    if getattr(dataset, "has_masks", False) and callable(getattr(dataset, "mask", None)):
        return lambda i: np.asarray(dataset.mask(i), dtype=bool)
    masks = getattr(dataset, "masks", None)
    if isinstance(dataset, GroundTruthBoxes) and masks is not None:
        return lambda i: np.asarray(masks[i], dtype=bool)
    return None
