"""How the standard splits are cut from a dataset's images: held-out fractions and balanced subsets.

``val`` picks the best epoch and must not be the set that is reported, so a dataset without a
separate validation set holds it out from its training images: :data:`VAL_FRACTION` of each
class (at least one image of every class with two or more), chosen with a fixed seed
(:data:`HOLDOUT_SEED`), so that train and val never overlap whatever seed a run uses.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

__all__ = ["HOLDOUT_SEED", "SPLITS", "TEST_FRACTION", "VAL_FRACTION", "Subsettable", "balanced_subset", "held_out", "train_val"]

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
HOLDOUT_SEED = 0

_D = TypeVar("_D", bound="Subsettable")


@runtime_checkable
class Subsettable(Protocol):
    """A dataset with labels that can be restricted to some of its images."""

    labels: np.ndarray

    def subset(self: _D, indices) -> _D:
        """The same dataset restricted to `indices` (in that order)."""
        ...


def held_out(labels: np.ndarray, fraction: float, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """A bool mask choosing `fraction` of each class (at least one of classes with >= 2 images)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        k = max(k, 1) if len(members) >= 2 else 0
        out[rng.permutation(members)[:k]] = True
    return out


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `size` samples, as evenly spread over classes as possible."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    chosen = order[np.argsort(rank[order], kind="stable")[:size]]
    return np.sort(chosen)


def train_val(train: _D, split: str) -> _D:
    """The ``train`` or ``val`` split of a dataset's training images (val: :func:`held_out` by :data:`VAL_FRACTION`).

    Args:
        train: The dataset's training images.
        split: "train" (the images not held out) or "val" (the held-out ones).
    """
    if split not in ("train", "val"):
        raise ValueError(f"train_val cuts the 'train' or 'val' split, not {split!r}")
    hold = held_out(train.labels, VAL_FRACTION)
    return train.subset(np.flatnonzero(hold if split == "val" else ~hold))
