"""ImageNet-1k from its files: class folders or flat files, boxes from VOC XML or the CSV form.

Layouts found under ``root`` (the first that exists wins):

* ``root/<split>/`` (torchvision / "valprep" layout), or the Kaggle layout
  ``root/ILSVRC/Data/CLS-LOC/<split>/``; ``<split>`` is ``train`` or ``val``.
* Inside it, either class folders ``<wnid>/<image>`` or flat files (the official val
  archive: ``ILSVRC2012_val_00000001.JPEG``), whose labels then come from the boxes' files.

Class index order is torchvision's: the sorted wnids. The wnids are read from
``LOC_synset_mapping.txt`` (Kaggle) when present, else from the class folders of
``train/``, else from those of the split, else from the annotations (with a warning when
fewer than 1000 classes appear).

Boxes (``boxes=`` or found automatically):

* PASCAL-VOC XML files, one per image, named like the image (``<stem>.xml``): next to the
  images, or under ``root/Annotations/CLS-LOC/<split>/`` / ``root/ILSVRC/Annotations/CLS-LOC/<split>/``
  (the official ``ILSVRC2012_bbox_val_v3.tgz`` unpacks to such a folder; pass it as ``boxes=``).
* The single CSV ``LOC_<split>_solution.csv`` (``ImageId,PredictionString`` with
  ``wnid xmin ymin xmax ymax`` repeated), in ``root`` or passed as ``boxes=``.

The CSV is read strictly, since one bad row would otherwise shift boxes between images: the
header and every row hold exactly two fields (no quotes: a quote character is an error), every
``ImageId`` appears once, and the PredictionString is whole groups of a wnid (``n`` and 8
digits) and four numbers. The XML files must give numbers in every ``<bndbox>`` field and in
``<size>`` (a ``<size>`` of 0 x 0 counts as absent); the stated size is checked against the image
file whenever the image or its boxes are read. Errors name the file, the line or field, and the value.

Coordinate convention (ours, as the ILSVRC and WSOL evaluation code, which adds 1 to
widths): ``xmin..xmax`` are 0-based *inclusive* pixel indices, so the box is
``(xmin, ymin, xmax + 1, ymax + 1)`` with exclusive ``x1, y1``. On ``val`` every image
must have its annotation (a missing one is an error); on ``train`` only some images have
boxes, the others have none.

The dataset kind ``imagenet:<root>[?boxes=...]``: ``test`` is the official val split (with the
boxes of ``boxes=`` or those found under the root), ``train`` and ``val`` are cut from the
official train split (:func:`epviz.data.splits.train_val`).
"""

from __future__ import annotations

import math
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from epviz.data.annotated import AnnotatedImages, AnnotationError, Sample
from epviz.data.images import IMAGE_SUFFIXES, ImageFolderDataset
from epviz.data.registry import DatasetSpec, register_dataset
from epviz.data.splits import train_val

__all__ = ["imagenet", "imagenet_split", "read_voc_xml", "read_solution_csv", "imagenet_classes", "SPLITS"]

SPLITS = ("train", "val")
NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")


def imagenet(
    root: str | Path, split: str = "val", *, boxes: str | Path | None = None, classes: list[str] | None = None, transform=None
) -> AnnotatedImages:
    """The ImageNet-1k images of one official split, with labels and (where present) boxes.

    Args:
        root: The dataset root (see the module docstring for the layouts).
        split: "train" or "val" (the official validation set: the usual test set of probes).
        boxes: A folder of XML files or a ``LOC_<split>_solution.csv`` file; default: found under `root`.
        classes: The wnids in index order; default: found under `root` (sorted wnids).
        transform: Evaluation transform (default Resize 256 + CenterCrop 224, bicubic).

    Raises:
        FileNotFoundError: `root`, the split folder or the `boxes` path does not exist.
        AnnotationError: A missing or malformed annotation, an unknown wnid.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"ImageNet split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root {root} does not exist")
    folder = _split_folder(root, split)
    class_folders = _has_class_folders(folder)
    source = _box_source(root, split, folder, boxes)
    annotations = read_solution_csv(source) if isinstance(source, Path) and source.is_file() else None
    wnids = classes or imagenet_classes(root)
    files: list[tuple[Path, str | None]]
    if class_folders:
        scan = ImageFolderDataset(folder)
        files = [(path, scan.classes[label]) for path, label in scan.samples]
    else:
        files = [(p, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise FileNotFoundError(f"{folder} holds neither class folders nor images ({', '.join(IMAGE_SUFFIXES)})")
        if source is None:
            raise AnnotationError(
                f"{folder} holds flat image files, whose labels come from their annotations, but no boxes were found: "
                f"pass boxes= (a folder of the per-image XML files, or LOC_{split}_solution.csv)"
            )
    records = []
    for path, wnid in files:
        record = _record(path, source, annotations, strict=split == "val")
        if wnid is None:
            wnid = record[3]
        records.append((path, wnid, record))
    if wnids is None:
        wnids = sorted({w for _, w, _ in records})
        if len(wnids) != NUM_CLASSES:
            warnings.warn(
                f"ImageNet classes were read from the annotations and only {len(wnids)} wnids appear; class indices follow "
                "these sorted wnids, not the 1000 ImageNet classes — pass classes= or add LOC_synset_mapping.txt / train/",
                stacklevel=2,
            )
    index = {w: i for i, w in enumerate(wnids)}
    samples = []
    for path, wnid, (box, size, src, _) in records:
        if wnid not in index:
            raise AnnotationError(f"{path.name} is of class {wnid!r}, which is not among the {len(wnids)} ImageNet classes found")
        samples.append(Sample(path=path, label=index[wnid], boxes=box, size=size, source=src))
    images = AnnotatedImages("imagenet", split, samples, wnids, root, transform, has_boxes=source is not None)
    images.standard_split = "test" if split == "val" else "train"  # the official val images are the probes' test set
    return images


@register_dataset("imagenet", options={"resize": int, "crop": int, "boxes": str})
def imagenet_split(spec: DatasetSpec, split: str) -> AnnotatedImages:
    """One standard split of ImageNet-1k: test is the official val, train / val are held out from train."""
    if split == "test":
        return imagenet(spec.folder, "val", boxes=spec.options.get("boxes"), transform=spec.transform)
    return train_val(imagenet(spec.folder, "train", transform=spec.transform), split)


def imagenet_classes(root: str | Path) -> list[str] | None:
    """The sorted wnids found under `root` (synset mapping file, or train/ class folders), or None."""
    root = Path(root)
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        wnids = [line.split()[0] for line in mapping.read_text().splitlines() if line.strip()]
        return sorted(wnids)
    for split in ("train", "val"):
        try:
            folder = _split_folder(root, split)
        except FileNotFoundError:
            continue
        if _has_class_folders(folder):
            return sorted(d.name for d in folder.iterdir() if d.is_dir())
    return None


def read_voc_xml(path: str | Path) -> tuple[np.ndarray, tuple[int, int] | None, list[str]]:
    """Boxes (k, 4, exclusive x1/y1), image (width, height) and object names of one PASCAL-VOC XML file.

    Raises:
        AnnotationError: The file is not XML, a ``<bndbox>`` lacks a field, or a field of
            ``<bndbox>`` or ``<size>`` is not a number (the message names the field and its value).
    """
    path = Path(path)
    try:
        tree = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise AnnotationError(f"cannot read the annotation {path}: {err}; the XML file is malformed — replace it") from err
    size = None
    if (node := tree.find("size")) is not None:
        width, height = (_xml_number(node, k, path, "<size>", int) for k in ("width", "height"))
        size = (width, height) if width > 0 and height > 0 else None
    boxes, names = [], []
    for n, obj in enumerate(tree.iter("object"), start=1):
        bb = obj.find("bndbox")
        if bb is None or any(bb.find(k) is None for k in ("xmin", "ymin", "xmax", "ymax")):
            raise AnnotationError(f"<object> {n} of {path} lacks a complete <bndbox> (xmin, ymin, xmax, ymax)")
        x0, y0, x1, y1 = (_xml_number(bb, k, path, f"<bndbox> of <object> {n}", float) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0, y0, x1 + 1, y1 + 1))
        names.append((obj.findtext("name") or "").strip())
    if not boxes:
        raise AnnotationError(f"{path} holds no <object> with a <bndbox>")
    return np.array(boxes, dtype=np.float64), size, names


def read_solution_csv(path: str | Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``ImageId -> (boxes (k, 4) exclusive x1/y1, wnids)`` from a ``LOC_*_solution.csv`` file.

    Raises:
        AnnotationError: A malformed header or row (see the module docstring); the message
            names the line (and, for a repeated ImageId, both lines).
    """
    path = Path(path)
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        lines = fh.read().splitlines()
    if not lines or [h.strip() for h in lines[0].split(",")] != ["ImageId", "PredictionString"]:
        raise AnnotationError(
            f"{path} is not a LOC solution CSV: its header must be 'ImageId,PredictionString', got {lines[0] if lines else ''!r}"
        )
    for line, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        where = f"{path}, line {line}"
        if '"' in text:
            raise AnnotationError(
                f"{where} holds a quote character, which a LOC solution CSV never has (a quote would merge "
                f"the following rows into this one): {text[:80]!r}; fix the row"
            )
        row = text.split(",")
        if len(row) != 2:
            raise AnnotationError(f"{where} has {len(row)} fields; a row is 'ImageId,PredictionString' (2 fields): {text[:80]!r}")
        image_id, parts = row[0].strip(), row[1].split()
        if not image_id:
            raise AnnotationError(f"{where} has no ImageId: {text[:80]!r}")
        if not parts or len(parts) % 5:
            raise AnnotationError(
                f"{where}: PredictionString must be whole groups of 'wnid xmin ymin xmax ymax'; "
                f"its {len(parts)} values are not a multiple of 5: {row[1]!r}"
            )
        boxes, wnids = [], []
        for g in range(0, len(parts), 5):
            wnid, coords = parts[g], parts[g + 1 : g + 5]
            if not _WNID.fullmatch(wnid):
                raise AnnotationError(
                    f"{where}: group {g // 5 + 1} of the PredictionString starts with {wnid!r}, not a wnid "
                    f"(n and 8 digits): {row[1]!r}"
                )
            try:
                numbers = [float(v) for v in coords]
            except ValueError:
                numbers = [float("nan")]
            if not all(math.isfinite(v) for v in numbers):
                raise AnnotationError(
                    f"{where}: group {g // 5 + 1} ({' '.join(parts[g : g + 5])}) has non-numeric box coordinates"
                )
            boxes.append(numbers)
            wnids.append(wnid)
        if image_id in first_line:
            raise AnnotationError(
                f"{path}: ImageId {image_id} appears on line {first_line[image_id]} and again on line {line}; "
                "each image has one row — merge or remove the repeated row"
            )
        first_line[image_id] = line
        b = np.array(boxes, dtype=np.float64)
        b[:, 2:] += 1
        out[image_id] = (b, wnids)
    return out


def _xml_number(node, field: str, path: Path, where: str, kind: type):
    """The finite number in ``<field>`` of `node` (int or float), or an AnnotationError naming field, value and file."""
    text = node.findtext(field)
    if text is None:
        raise AnnotationError(f"{where} in {path} lacks its <{field}>; fix the annotation file")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or (kind is int and not value.is_integer()):
        what = "a whole number" if kind is int else "a number"
        raise AnnotationError(f"<{field}> of {where} in {path} is {text.strip()!r}, not {what}; fix the annotation file")
    return kind(value)


# --- internals ----------------------------------------------------------------------------


def _split_folder(root: Path, split: str) -> Path:
    for folder in (root / split, root / "ILSVRC" / "Data" / "CLS-LOC" / split, root / "Data" / "CLS-LOC" / split):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no ImageNet {split} folder under {root}: expected {root / split} or {root}/ILSVRC/Data/CLS-LOC/{split}"
    )


def _has_class_folders(folder: Path) -> bool:
    return any(p.is_dir() for p in folder.iterdir())


def _box_source(root: Path, split: str, folder: Path, boxes) -> Path | str | None:
    if boxes is not None:
        path = Path(boxes)
        if not path.exists():
            raise FileNotFoundError(f"the ImageNet boxes {path} do not exist (a folder of XML files or LOC_{split}_solution.csv)")
        if path.is_file() and path.suffix.lower() != ".csv":
            raise AnnotationError(f"boxes={path} is neither a folder of XML files nor a LOC_{split}_solution.csv file")
        return path
    for candidate in (
        root / "ILSVRC" / "Annotations" / "CLS-LOC" / split,
        root / "Annotations" / "CLS-LOC" / split,
        root / f"LOC_{split}_solution.csv",
    ):
        if candidate.exists():
            return candidate
    if next(folder.rglob("*.xml"), None) is not None:
        return "beside"
    return None


def _record(path: Path, source, annotations: dict | None, strict: bool):
    """(boxes or None, size or None, source text, wnid or None) of one image."""
    if source is None:
        return None, None, None, None
    if annotations is not None:
        entry = annotations.get(path.stem)
        if entry is None:
            if strict:
                raise AnnotationError(
                    f"{source} has no row for {path.stem}: every val image needs its boxes — use the complete file"
                )
            return None, None, None, None
        return entry[0], None, f"{source.name} row {path.stem}", entry[1][0]
    xml = path.with_suffix(".xml") if source == "beside" else _xml_in(source, path)
    if not xml.is_file():
        if strict:
            raise AnnotationError(f"the annotation file {xml} of {path.name} is missing: every val image needs its XML file")
        return None, None, None, None
    boxes, size, names = read_voc_xml(xml)
    return boxes, size, str(xml), names[0] if names else None


def _xml_in(source: Path, image: Path) -> Path:
    flat = source / f"{image.stem}.xml"
    return flat if flat.is_file() else source / image.parent.name / f"{image.stem}.xml"
