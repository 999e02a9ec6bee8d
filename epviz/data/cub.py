"""CUB-200-2011 from its files: 200 bird species, one box per image.

``root`` is the ``CUB_200_2011`` folder (or the folder holding it), with::

    images.txt               <image id> <relative path under images/>
    image_class_labels.txt   <image id> <class id 1..200>
    train_test_split.txt     <image id> <1: train, 0: test>
    bounding_boxes.txt       <image id> <x> <y> <width> <height>
    classes.txt              <class id> <name>   (optional: names are taken from the folders otherwise)
    images/<class folder>/<image>.jpg

Labels are ``class id - 1``. A box ``(x, y, w, h)`` becomes ``(x, y, x + w, y + h)``
(exclusive ``x1, y1``, as in the WSOL evaluation of Choe et al.).

The dataset kind ``cub:<root>``: ``test`` is the official test split, ``train`` and ``val``
are cut from the official train split (:func:`epviz.data.splits.train_val`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from epviz.data.annotated import AnnotatedImages, AnnotationError, Sample
from epviz.data.registry import DatasetSpec, register_dataset
from epviz.data.splits import train_val

__all__ = ["cub", "cub_split", "SPLITS", "REQUIRED_FILES"]

SPLITS = ("train", "test")
REQUIRED_FILES = {
    "images.txt": "image id -> file",
    "image_class_labels.txt": "image id -> class id",
    "train_test_split.txt": "image id -> train (1) / test (0)",
    "bounding_boxes.txt": "image id -> x y width height",
}


def cub(root: str | Path, split: str = "train", *, transform=None) -> AnnotatedImages:
    """The CUB-200-2011 images of one split with labels and boxes.

    Args:
        root: The ``CUB_200_2011`` folder (or its parent).
        split: "train" or "test" (``train_test_split.txt``).
        transform: Evaluation transform (default Resize 256 + CenterCrop 224, bicubic).

    Raises:
        FileNotFoundError: `root` or an image does not exist.
        AnnotationError: A missing or inconsistent annotation file.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"CUB split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"CUB root {root} does not exist")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    tables = {}
    for name, what in REQUIRED_FILES.items():
        path = root / name
        if not path.is_file():
            raise AnnotationError(
                f"CUB annotation file {path} ({what}) is missing; unpack the complete CUB_200_2011.tgz into {root}"
            )
        tables[name] = _read_table(path)
    files, labels, is_train, boxes = (tables[n] for n in REQUIRED_FILES)
    for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        missing = [i for i in files if i not in tables[name]]
        if missing:
            raise AnnotationError(
                f"{root / name} has no line for image ids {missing[:5]}{'...' if len(missing) > 5 else ''} listed in images.txt"
            )
    class_ids = sorted({_int(labels[i][0], root / "image_class_labels.txt", i) for i in files})
    names = _class_names(root, files, labels, class_ids)
    samples, absent = [], []
    for image_id, (rel,) in files.items():
        if _int(is_train[image_id][0], root / "train_test_split.txt", image_id) != (split == "train"):
            continue
        path = root / "images" / rel
        if not path.is_file():
            absent.append(str(path))
            continue
        try:
            x, y, w, h = (float(v) for v in boxes[image_id])
        except ValueError as err:
            raise AnnotationError(
                f"{root / 'bounding_boxes.txt'}: image id {image_id} needs 'x y width height', got {boxes[image_id]}"
            ) from err
        label = _int(labels[image_id][0], root / "image_class_labels.txt", image_id) - 1
        samples.append(
            Sample(path=path, label=label, boxes=np.array([[x, y, x + w, y + h]]), source=f"bounding_boxes.txt id {image_id}")
        )
    if absent:
        raise FileNotFoundError(f"{len(absent)} CUB images listed in images.txt are missing, e.g. {absent[0]}")
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise AnnotationError(f"CUB class ids must run 1..{len(class_ids)}; got {class_ids[:5]}...")
    return AnnotatedImages("cub", split, samples, names, root, transform, has_boxes=True)


def _read_table(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise AnnotationError(f"{path}: line {line!r} needs an image id and a value")
        out[parts[0]] = parts[1:]
    return out


def _int(text: str, path: Path, image_id: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise AnnotationError(f"{path}: image id {image_id} has {text!r}, expected an integer") from err


def _class_names(root: Path, files: dict, labels: dict, class_ids: list[int]) -> list[str]:
    path = root / "classes.txt"
    if path.is_file():
        table = {int(k): v[0] for k, v in _read_table(path).items()}
        return [table.get(c, str(c)) for c in class_ids]
    folders = {int(labels[i][0]): rel.split("/")[0] for i, (rel,) in files.items()}
    return [folders.get(c, str(c)) for c in class_ids]


@register_dataset("cub", options={"resize": int, "crop": int})
def cub_split(spec: DatasetSpec, split: str) -> AnnotatedImages:
    """One standard split of CUB-200-2011: test, or train / val held out from the official train split."""
    if split == "test":
        return cub(spec.folder, "test", transform=spec.transform)
    return train_val(cub(spec.folder, "train", transform=spec.transform), split)
