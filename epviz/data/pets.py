"""The Oxford-IIIT Pets from its files: 37 breeds, a trimap per image (mask and box).

``root`` holds ``images/<name>.jpg`` and ``annotations/`` with ``list.txt`` (all images),
``trainval.txt`` and ``test.txt`` (the official split), each line
``<name> <class id 1..37> <species> <breed id>``, and ``trimaps/<name>.png`` with
1 = pet, 2 = background, 3 = border (the outline around the pet).

Labels are ``class id - 1``; a class's name is its images' name without the trailing
``_<number>``. Our definitions: the **mask** is the pet with its border (trimap 1 or 3),
and the **box** the tightest box around that mask (exclusive ``x1, y1``).

The dataset kind ``pets:<root>``: ``test`` is the official test split, ``train`` and ``val``
are cut from the official trainval split (:func:`epviz.data.splits.train_val`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from epviz.data.annotated import AnnotatedImages, AnnotationError, Sample
from epviz.data.registry import DatasetSpec, register_dataset
from epviz.data.splits import train_val

__all__ = ["pets", "pets_split", "read_trimap", "SPLITS"]

SPLITS = ("trainval", "test")
_FOREGROUND = (1, 3)


def pets(root: str | Path, split: str = "trainval", *, transform=None) -> AnnotatedImages:
    """The Oxford-IIIT Pets images of one official split, with labels, masks and boxes.

    Args:
        root: The folder holding ``images/`` and ``annotations/``.
        split: "trainval" or "test".
        transform: Evaluation transform (default Resize 256 + CenterCrop 224, bicubic).

    Raises:
        FileNotFoundError: `root`, an image or a trimap does not exist.
        AnnotationError: A missing or malformed split file.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"Pets split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"Oxford-IIIT Pets root {root} does not exist")
    ann = root / "annotations"
    split_file = ann / f"{split}.txt"
    if not split_file.is_file():
        raise AnnotationError(f"the Pets split file {split_file} is missing; unpack annotations.tar.gz into {root}")
    rows = _read_list(split_file)
    names = _class_names(ann / "list.txt", rows)
    samples, absent = [], []
    for name, class_id in rows:
        path, trimap = root / "images" / f"{name}.jpg", ann / "trimaps" / f"{name}.png"
        for f in (path, trimap):
            if not f.is_file():
                absent.append(str(f))
        samples.append(Sample(path=path, label=class_id - 1, mask_path=trimap, source=str(trimap)))
    if absent:
        raise FileNotFoundError(f"{len(absent)} files named in {split_file} are missing (image or trimap), e.g. {absent[0]}")
    return AnnotatedImages("pets", split, samples, names, root, transform, mask_reader=read_trimap, boxes_from_masks=True)


def read_trimap(path: str | Path) -> np.ndarray:
    """The pet mask (trimap 1 or 3) of one trimap PNG, bool (H, W).

    Raises:
        AnnotationError: The file cannot be read or holds values other than 1, 2, 3.
    """
    try:
        with Image.open(path) as img:
            values = np.asarray(img)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise AnnotationError(f"cannot read the trimap {path} ({err}); replace it with the file from annotations.tar.gz") from err
    if values.ndim != 2 or not np.isin(values, (1, 2, 3)).all():
        raise AnnotationError(
            f"{path} is not a Pets trimap: it must be one channel of values 1 (pet), 2 (background), 3 (border)"
        )
    return np.isin(values, _FOREGROUND)


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            rows.append((parts[0], int(parts[1])))
        except (IndexError, ValueError) as err:
            raise AnnotationError(f"{path}, line {n}: expected '<name> <class id> <species> <breed id>', got {line!r}") from err
    if not rows:
        raise AnnotationError(f"{path} lists no images")
    return rows


def _class_names(list_file: Path, rows: list[tuple[str, int]]) -> list[str]:
    pairs = _read_list(list_file) + rows if list_file.is_file() else rows
    names: dict[int, str] = {}
    for name, class_id in pairs:
        names.setdefault(class_id, name.rsplit("_", 1)[0])
    ids = sorted(names)
    if ids != list(range(1, len(ids) + 1)):
        raise AnnotationError(f"Pets class ids must run 1..{len(ids)}, got {ids[:5]}... (is {list_file} complete?)")
    return [names[i] for i in ids]


@register_dataset("pets", options={"resize": int, "crop": int})
def pets_split(spec: DatasetSpec, split: str) -> AnnotatedImages:
    """One standard split of the Pets: test, or train / val held out from the official trainval split."""
    if split == "test":
        return pets(spec.folder, "test", transform=spec.transform)
    return train_val(pets(spec.folder, "trainval", transform=spec.transform), split)
