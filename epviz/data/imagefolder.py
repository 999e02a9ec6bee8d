"""Folders of class folders (``<class>/<image>``) as labelled datasets without boxes: the kind ``imagefolder``.

The standard splits of ``imagefolder:<root>``:

* ``root/train``, ``root/val`` and ``root/test`` all present: each split is its folder.
* ``root/train`` and one of ``val`` / ``test``: that folder is ``test``, and ``val`` is held
  out from ``train`` (:func:`epviz.data.splits.train_val`).
* no ``root/train``: the class folders of ``root`` are one pool; :data:`~epviz.data.splits.TEST_FRACTION`
  of each class is ``test``, and ``val`` is held out from the rest (fixed seeds).

Class indices follow the sorted class folders of ``train/`` (or of the pool).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from epviz.data.annotated import AnnotatedImages, Sample
from epviz.data.images import ImageFolderDataset
from epviz.data.registry import DatasetSpec, register_dataset
from epviz.data.splits import HOLDOUT_SEED, TEST_FRACTION, held_out, train_val

__all__ = ["image_folder", "imagefolder_split"]


def image_folder(folder: str | Path, split: str, transform=None, classes_from: str | Path | None = None) -> AnnotatedImages:
    """An ImageFolder (``<class>/<image>``) as an :class:`AnnotatedImages` without boxes.

    Args:
        folder: The folder of class folders.
        split: Name of the split (for fingerprints).
        transform: Evaluation transform.
        classes_from: Another folder of class folders whose sorted names fix the class indices
            (e.g. ``train/`` for ``test/``).
    """
    scan = ImageFolderDataset(folder)
    classes = scan.classes
    if classes_from is not None:
        classes = sorted(d.name for d in Path(classes_from).iterdir() if d.is_dir())
        unknown = sorted(set(scan.classes) - set(classes))
        if unknown:
            raise ValueError(
                f"{folder} has class folders {unknown[:5]} that {classes_from} does not have; both need the same classes"
            )
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(path=p, label=index[scan.classes[label]]) for p, label in scan.samples]
    return AnnotatedImages("imagefolder", split, samples, classes, Path(folder), transform)


@register_dataset("imagefolder", options={"resize": int, "crop": int})
def imagefolder_split(spec: DatasetSpec, split: str) -> AnnotatedImages:
    """One standard split of a folder of class folders (see the module docstring)."""
    root = spec.folder
    if not (root / "train").is_dir():
        pool = image_folder(root, "all", spec.transform)
        test = held_out(pool.labels, TEST_FRACTION, HOLDOUT_SEED)
        if split == "test":
            return pool.subset(np.flatnonzero(test))
        return train_val(pool.subset(np.flatnonzero(~test)), split)
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    if split == "test":
        if not (has_val or has_test):
            raise FileNotFoundError(
                f"{root} has train/ but neither test/ nor val/: add the images to report on as {root / 'test'}"
            )
        return image_folder(root / ("test" if has_test else "val"), "test", spec.transform, classes_from=root / "train")
    if has_val and has_test:
        return image_folder(root / split, split, spec.transform, classes_from=None if split == "train" else root / "train")
    return train_val(image_folder(root / "train", "train", spec.transform), split)
