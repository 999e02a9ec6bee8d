"""What a dataset loop does with an image it cannot read: stop (the default) or leave the image out.

``on_error="raise"`` (the default everywhere): the first unreadable image stops the loop (token
extraction, training, evaluation) with an error naming the file, the reason and the fix.

``on_error="skip"`` (:func:`epviz.data.load_split`, :func:`epviz.data.standard_splits`): when a
split is opened, every image of it is read once, as :meth:`~epviz.data.AnnotatedImages.check`
reads it (decoded, with its boxes, size and mask checked against it). Each image that raises a
:class:`~epviz.errors.DataError` (a corrupt, missing or too large file, or an annotation that
does not fit it) is dropped from the dataset and listed on stderr, followed by one final
``N files skipped`` line; ``dataset.skipped`` keeps the list (:class:`SkippedImage`).

Design: the images are dropped from the dataset itself, before any token is computed, so nothing
downstream can score them. The token cache holds only the kept images (the dataset's fingerprint
lists only their files, so a cache of the full split is never reused), and labels, boxes and every
metric are indexed over the kept images alone; no mask has to be honoured by each consumer. The
splits are cut before images are dropped (and ``size`` is applied first), so skipping never moves
an image from one split into another; a split may then hold fewer than ``size`` images. The cost
is one extra decode of every image of the split.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from epviz.data.splits import Subsettable
from epviz.errors import ConfigError, DataError

__all__ = ["ON_ERROR", "SkippedImage", "check_on_error", "drop_unreadable"]

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class SkippedImage:
    """One image left out by ``on_error="skip"``.

    Attributes:
        file: The image file (or ``image <index>`` for a dataset without files).
        reason: The error that reading it raised.
    """

    file: str
    reason: str


def check_on_error(on_error: str) -> str:
    """`on_error` when it is one of :data:`ON_ERROR`.

    Raises:
        ConfigError: Any other value.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(
            f"on_error must be 'raise' (stop at the first unreadable image) or 'skip' (leave unreadable images "
            f"out, listed), got {on_error!r}"
        )
    return on_error


def drop_unreadable(dataset: Any, what: str = "the dataset", stream: TextIO | None = None) -> Any:
    """`dataset` without the images that cannot be read, which are listed on `stream` (default stderr).

    Each image is read with ``dataset.check(i)`` when the dataset has it, else ``dataset[i]``.

    Args:
        dataset: A dataset with ``subset(indices)`` (:class:`~epviz.data.splits.Subsettable`).
        what: How the listing names the dataset ("the test split of cub:/data/CUB_200_2011").
        stream: Where the listing goes.

    Returns:
        `dataset` itself when every image reads; otherwise the subset of the readable images,
        with ``skipped``: the list of :class:`SkippedImage`.

    Raises:
        DataError: No image of `dataset` can be read.
        TypeError: Some images cannot be read and `dataset` has no ``subset()``.
    """
    check = getattr(dataset, "check", None)
    read = check if callable(check) else dataset.__getitem__
    total, keep, skipped = len(dataset), [], []
    for i in range(total):
        try:
            read(i)
        except DataError as err:
            skipped.append(SkippedImage(_file(dataset, i), str(err)))
        else:
            keep.append(i)
    if not skipped:
        return dataset
    if not keep:
        raise DataError(f"none of the {total} images of {what} can be read, e.g. {skipped[0].file}: {skipped[0].reason}")
    if not isinstance(dataset, Subsettable):
        raise TypeError(
            f"{len(skipped)} images of {what} cannot be read (e.g. {skipped[0].file}), and its "
            f"{type(dataset).__name__} has no subset(indices) to leave them out; give it one or fix the files"
        )
    kept: Any = dataset.subset(np.asarray(keep, dtype=np.int64))
    kept.skipped = skipped
    out = sys.stderr if stream is None else stream
    for item in skipped:
        print(f"skipped {item.file}: {item.reason}", file=out)
    count = f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped"
    print(
        f"{count} of the {total} images of {what} (left out of the dataset, its tokens and every metric; "
        "dataset.skipped lists them)",
        file=out,
        flush=True,
    )
    return kept


def _file(dataset: Any, index: int) -> str:
    samples: Any = getattr(dataset, "samples", None)
    try:
        item = samples[index]
    except (TypeError, IndexError, KeyError):
        return f"image {index}"
    path = getattr(item, "path", item[0] if isinstance(item, tuple) else None)
    return str(path) if path is not None else f"image {index}"
