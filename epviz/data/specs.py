"""Dataset specs: one string names a dataset on disk and how its splits are formed.

Syntax: ``"<kind>:<root>"``, optionally followed by ``?key=value&key=value``::

    imagenet:/data/imagenet                       train/ and val/ (class folders or flat + boxes)
    imagenet:/data/imagenet?boxes=/data/LOC_val_solution.csv
    cub:/data/CUB_200_2011
    pets:/data/oxford-iiit-pet
    imagefolder:/data/my_images                   train/ [val/] [test/] of class folders, or class folders only
    imagefolder:/data/my_images?resize=292&crop=256

Options: ``resize`` and ``crop`` (evaluation transform, default 256 / 224) for every kind;
``boxes`` (a folder of XML files or a ``LOC_val_solution.csv``) for imagenet.

The three standard splits (``train``, ``val``, ``test``):

=============  ==================  ===================  ===========================
kind           train               val                  test
=============  ==================  ===================  ===========================
imagenet       train, minus val    10% of train         the official val (50,000)
cub            train, minus val    10% of train         test
pets           trainval, minus val 10% of trainval      test
imagefolder    train/, minus val   val/ if test/ exists test/, else val/
=============  ==================  ===================  ===========================

``val`` picks the best epoch and must not be the set that is reported, so it is held out
from the training images whenever the dataset has no separate validation set:
:data:`VAL_FRACTION` of each class (at least one image of every class with two or more),
chosen with a fixed seed (:data:`HOLDOUT_SEED`), so that train and val never overlap
whatever ``seed`` is. An imagefolder without ``train/`` is one pool of class folders:
20% of each class is test, 10% val, the rest train (fixed seed as well).

``size`` takes at most that many images of the split, spread as evenly as possible over
the classes, chosen by ``seed`` (None: every image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from epviz.data.annotated import AnnotatedImages
from epviz.data.transforms import EvalTransform

__all__ = ["DEFAULT_DATASET", "DATASETS", "DatasetSpec", "KINDS", "parse_spec", "open_split", "load_split", "standard_splits",
           "held_out", "balanced_subset", "VAL_FRACTION", "HOLDOUT_SEED"]

KINDS = ("imagenet", "cub", "pets", "imagefolder")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
HOLDOUT_SEED = 0
SPLITS = ("train", "val", "test")
_OPTIONS = {"resize": int, "crop": int, "boxes": str}
DEFAULT_DATASET = "cluttered-fashion-mnist"
DATASETS = (DEFAULT_DATASET, *(f"{kind}:<root>" for kind in KINDS))
_CANVAS_SOURCES = {"train": ("train", 0), "val": ("train", 1), "test": ("test", 0)}  # split -> (item split, seed offset)
_CANVAS_SIZES = {"train": 20_000, "val": 2_000, "test": 4_000}


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec."""

    kind: str
    root: Path
    options: dict = field(default_factory=dict)

    @property
    def transform(self) -> EvalTransform:
        """The evaluation transform the options ask for."""
        return EvalTransform(**{k: self.options[k] for k in ("resize", "crop") if k in self.options})


def is_spec(spec: str) -> bool:
    """Whether `spec` looks like ``<kind>:<root>`` with a known kind."""
    return isinstance(spec, str) and spec.split(":", 1)[0] in KINDS and ":" in spec


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``"<kind>:<root>[?key=value&...]"`` (see the module docstring).

    Raises:
        ValueError: Unknown kind or option, malformed option value.
        FileNotFoundError: The root folder does not exist.
    """
    if not is_spec(spec):
        raise ValueError(f"{spec!r} is not a dataset spec; write '<kind>:<root>' with kind one of {', '.join(KINDS)}")
    kind, rest = spec.split(":", 1)
    root, options = rest, {}
    if "?" in rest:
        root, query = rest.rsplit("?", 1)
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key not in _OPTIONS or (key == "boxes" and kind != "imagenet"):
                known = [k for k in _OPTIONS if k != "boxes" or kind == "imagenet"]
                raise ValueError(f"unknown option {key!r} in dataset spec {spec!r}; options of {kind}: {', '.join(known)}")
            try:
                options[key] = _OPTIONS[key](value)
            except ValueError as err:
                raise ValueError(f"option {key}={value!r} of {spec!r} must be {_OPTIONS[key].__name__}") from err
    if not root:
        raise ValueError(f"dataset spec {spec!r} names no folder: write '{kind}:/path/to/{kind}'")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"the {kind} folder {path} of dataset spec {spec!r} does not exist; point the spec at the dataset's root")
    parsed = DatasetSpec(kind, path, options)
    parsed.transform  # noqa: B018 - validates resize/crop now
    return parsed


def open_split(spec: str | DatasetSpec, split: str, size: int | None = None, seed: int = 0) -> AnnotatedImages:
    """One standard split of a dataset on disk (see the module docstring).

    Args:
        spec: A dataset spec string or a parsed :class:`DatasetSpec`.
        split: "train", "val" or "test".
        size: At most this many images, balanced over classes (None: all).
        seed: Chooses which images when `size` is smaller than the split.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    data = _SPLITTERS[spec.kind](spec, split)
    if size is not None:
        if int(size) < 1:
            raise ValueError(f"size must be a positive number of images, got {size}")
        data = data.subset(balanced_subset(data.labels, int(size), seed))
    if len(data) == 0:
        raise ValueError(f"the {split} split of {spec.kind}:{spec.root} is empty")
    return data


def load_split(spec: str = DEFAULT_DATASET, split: str = "train", size: int | None = None, seed: int = 0):
    """One split of a dataset named by a spec: the seam where datasets plug in.

    Args:
        spec: "cluttered-fashion-mnist" or a dataset on disk, ``"<kind>:<root>"`` (see the module docstring).
        split: "train", "val" or "test". Canvases: "val" holds other canvases of the train items
            (seed ``seed + 1``), "test" canvases of the test items.
        size: Number of images; canvases default to the full standard size (20,000 / 2,000 /
            4,000); datasets on disk keep at most that many, balanced over classes (None: all).
        seed: Seed of the dataset's randomness (on disk: which images a `size` keeps).

    Raises:
        ValueError: Unknown dataset spec, option or split.
        FileNotFoundError: The root folder of a dataset on disk does not exist.
    """
    if isinstance(spec, str) and is_spec(spec):
        return open_split(spec, split, size, seed)
    if spec != DEFAULT_DATASET:
        raise ValueError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASETS)} "
                         f"(<root>: the dataset's folder, e.g. 'imagenet:/data/imagenet')")
    if split not in _CANVAS_SOURCES:
        raise ValueError(f"unknown split {split!r} of {spec}; use one of {', '.join(_CANVAS_SOURCES)}")
    from epviz.data.cluttered import ClutteredFashionMNIST

    source, offset = _CANVAS_SOURCES[split]
    size = _CANVAS_SIZES[split] if size is None else int(size)
    return ClutteredFashionMNIST(source, size, seed=seed + offset)


def standard_splits(spec: str, sizes: Mapping[str, int | None], splits: Sequence[str] = SPLITS) -> dict:
    """The standard train / val / test datasets of a spec at the given sizes.

    Args:
        spec: Dataset spec (see :func:`load_split`).
        sizes: Images per split (see :class:`epviz.Setting`).
        splits: Which of "train", "val", "test" to build.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; the standard splits are {', '.join(SPLITS)}")
    return {split: load_split(spec, split, sizes.get(split)) for split in splits}


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


# --- splits of each kind ----------------------------------------------------------------------


def _train_val(train: AnnotatedImages, split: str) -> AnnotatedImages:
    hold = held_out(train.labels, VAL_FRACTION)
    return train.subset(np.flatnonzero(hold if split == "val" else ~hold))


def _imagenet(spec: DatasetSpec, split: str) -> AnnotatedImages:
    from epviz.data.imagenet import imagenet

    if split == "test":
        return imagenet(spec.root, "val", boxes=spec.options.get("boxes"), transform=spec.transform)
    return _train_val(imagenet(spec.root, "train", transform=spec.transform), split)


def _cub(spec: DatasetSpec, split: str) -> AnnotatedImages:
    from epviz.data.cub import cub

    return cub(spec.root, "test", transform=spec.transform) if split == "test" else _train_val(cub(spec.root, "train", transform=spec.transform), split)


def _pets(spec: DatasetSpec, split: str) -> AnnotatedImages:
    from epviz.data.pets import pets

    if split == "test":
        return pets(spec.root, "test", transform=spec.transform)
    return _train_val(pets(spec.root, "trainval", transform=spec.transform), split)


def _imagefolder(spec: DatasetSpec, split: str) -> AnnotatedImages:
    root = spec.root
    if not (root / "train").is_dir():
        pool = image_folder(root, "all", spec.transform)
        test = held_out(pool.labels, TEST_FRACTION, HOLDOUT_SEED)
        if split == "test":
            return pool.subset(np.flatnonzero(test))
        rest = pool.subset(np.flatnonzero(~test))
        return _train_val(rest, split)
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    if split == "test":
        if not (has_val or has_test):
            raise FileNotFoundError(f"{root} has train/ but neither test/ nor val/: add the images to report on as {root / 'test'}")
        return image_folder(root / ("test" if has_test else "val"), "test", spec.transform, classes_from=root / "train")
    if has_val and has_test:
        return image_folder(root / split, split, spec.transform, classes_from=None if split == "train" else root / "train")
    return _train_val(image_folder(root / "train", "train", spec.transform), split)


def image_folder(folder: str | Path, split: str, transform=None, classes_from: str | Path | None = None) -> AnnotatedImages:
    """An ImageFolder (``<class>/<image>``) as an :class:`AnnotatedImages` without boxes.

    Args:
        folder: The folder of class folders.
        split: Name of the split (for fingerprints).
        transform: Evaluation transform.
        classes_from: Another folder of class folders whose sorted names fix the class indices
            (e.g. ``train/`` for ``test/``).
    """
    from epviz.data.annotated import Sample
    from epviz.data.images import ImageFolderDataset

    scan = ImageFolderDataset(folder)
    classes = scan.classes
    if classes_from is not None:
        classes = sorted(d.name for d in Path(classes_from).iterdir() if d.is_dir())
        unknown = sorted(set(scan.classes) - set(classes))
        if unknown:
            raise ValueError(f"{folder} has class folders {unknown[:5]} that {classes_from} does not have; both need the same classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(path=p, label=index[scan.classes[label]]) for p, label in scan.samples]
    return AnnotatedImages("imagefolder", split, samples, classes, Path(folder), transform)


_SPLITTERS = {"imagenet": _imagenet, "cub": _cub, "pets": _pets, "imagefolder": _imagefolder}
