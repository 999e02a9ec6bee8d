"""Dataset kinds, the specs that name them, and the standard splits: the seam where datasets plug in.

A dataset kind is one function that opens one standard split, registered in its own file::

    @register_dataset("cub", options={"resize": int, "crop": int})
    def cub_split(spec: DatasetSpec, split: str) -> AnnotatedImages:
        ...

A spec string names a kind, its root folder (for kinds on disk) and options::

    cluttered-fashion-mnist                       the embedded canvases (no folder)
    imagenet:/data/imagenet                       train/ and val/ (class folders or flat + boxes)
    imagenet:/data/imagenet?boxes=/data/LOC_val_solution.csv
    cub:/data/CUB_200_2011
    pets:/data/oxford-iiit-pet
    imagefolder:/data/my_images                   train/ [val/] [test/] of class folders, or class folders only
    imagefolder:/data/my_images?resize=292&crop=256

Options are declared by each kind (:func:`dataset_kinds` lists the kinds, :func:`dataset_kind`
their options); the kinds on disk take ``resize`` and ``crop`` (evaluation transform, default
256 / 224), imagenet also ``boxes`` (a folder of XML files or a ``LOC_val_solution.csv``).

The three standard splits (``train``, ``val``, ``test``) of the built-in kinds:

=======================  ==========================  ======================  ===========================
kind                     train                       val                     test
=======================  ==========================  ======================  ===========================
cluttered-fashion-mnist  canvases of train items     other canvases of them  canvases of the test items
imagenet                 train, minus val            10% of train            the official val (50,000)
cub                      train, minus val            10% of train            test
pets                     trainval, minus val         10% of trainval         test
imagefolder              train/, minus val           val/ if test/ exists    test/, else val/
=======================  ==========================  ======================  ===========================

``val`` is held out from the training images whenever a dataset has no separate validation set
(see :mod:`epviz.data.splits`). ``size`` takes at most that many images of a split, spread as
evenly as possible over the classes, chosen by ``seed`` (None: every image); a kind that draws
its images (the canvases) makes exactly ``size`` of them instead, with ``seed``.

``on_error``: ``"raise"`` (default) stops at the first unreadable image when it is read;
``"skip"`` reads every image of the split when it is opened and leaves out, and lists, those that
cannot be read (:mod:`epviz.data.unreadable`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

from epviz.data.protocol import ImageDataset, missing_members
from epviz.data.splits import SPLITS, Subsettable, balanced_subset
from epviz.data.transforms import EvalTransform
from epviz.data.unreadable import check_on_error, drop_unreadable

__all__ = [
    "DEFAULT_DATASET",
    "DatasetKind",
    "DatasetSpec",
    "dataset_kind",
    "dataset_kinds",
    "load_split",
    "parse_spec",
    "unregister_dataset",
    "register_dataset",
    "standard_splits",
]

DEFAULT_DATASET = "cluttered-fashion-mnist"
_KIND_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec.

    Attributes:
        kind: The registered kind.
        root: The dataset's folder (None for kinds without one).
        options: The spec's options, converted to their declared types.
    """

    kind: str
    root: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The root folder (what a kind on disk opens).

        Raises:
            ValueError: The spec names no folder (a kind without one).
        """
        if self.root is None:
            raise ValueError(f"dataset spec {str(self)!r} names no folder; the {self.kind} dataset has none")
        return self.root

    @property
    def transform(self) -> EvalTransform:
        """The evaluation transform the options ask for."""
        return EvalTransform(**{k: self.options[k] for k in ("resize", "crop") if k in self.options})

    def __str__(self) -> str:
        text = self.kind if self.root is None else f"{self.kind}:{self.root}"
        return f"{text}?{urlencode(self.options, safe='/:')}" if self.options else text


@dataclass(frozen=True)
class DatasetKind:
    """One registered dataset kind.

    Attributes:
        name: The kind, as written in specs.
        opener: Opens one standard split: ``opener(spec, split)``, or for a kind that draws its
            images ``opener(spec, split, size=, seed=)``.
        options: Spec options and their types (``{"resize": int}``).
        needs_root: Whether specs name a folder (``"<kind>:<root>"``) or not (``"<kind>"``).
        draws: Whether the kind draws ``size`` images with ``seed`` itself, instead of
            :func:`load_split` keeping a balanced subset of the opened split.
    """

    name: str
    opener: Callable[..., ImageDataset]
    options: Mapping[str, Callable[[str], Any]]
    needs_root: bool = True
    draws: bool = False

    @property
    def form(self) -> str:
        """How a spec of this kind is written (``"cub:<root>"``, ``"cluttered-fashion-mnist"``)."""
        return f"{self.name}:<root>" if self.needs_root else self.name


_KINDS: dict[str, DatasetKind] = {}


def register_dataset(
    kind: str,
    *,
    options: Mapping[str, Callable[[str], Any]] | None = None,
    needs_root: bool = True,
    draws: bool = False,
) -> Callable[[Callable[..., ImageDataset]], Callable[..., ImageDataset]]:
    """Register the function that opens one standard split of a dataset kind (a decorator).

    Args:
        kind: The kind's name in specs (lower case letters, digits, ``-``, ``_``, ``.``).
        options: Spec options and the types their values are converted to.
        needs_root: Specs name the dataset's folder (``"<kind>:<root>"``); False: a bare ``"<kind>"``.
        draws: The function draws its images: it is called ``opener(spec, split, size=, seed=)``
            and makes ``size`` images (None: its standard size) from ``seed``.

    Raises:
        ValueError: A malformed name, or the name is taken by another function.
    """
    if not isinstance(kind, str) or not _KIND_NAME.fullmatch(kind):
        raise ValueError(f"dataset kind {kind!r} must be lower case letters, digits, '-', '_' or '.' (it is written in specs)")
    declared = dict(options or {})
    bad = [k for k, v in declared.items() if not callable(v)]
    if bad:
        raise ValueError(f"options {bad} of dataset kind {kind!r} need a type (e.g. int, str) to convert their values")

    def add(opener: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        taken = _KINDS.get(kind)
        if taken is not None and _origin(taken.opener) != _origin(opener):
            raise ValueError(f"dataset kind {kind!r} is already registered by {_origin(taken.opener)}; choose another name")
        _KINDS[kind] = DatasetKind(kind, opener, declared, bool(needs_root), bool(draws))
        return opener

    return add


def unregister_dataset(kind: str) -> DatasetKind:
    """Remove a registered kind (e.g. one a test or a notebook cell registered) and return its registration.

    Raises:
        ValueError: Unknown kind.
    """
    entry = dataset_kind(kind)
    del _KINDS[kind]
    return entry


def dataset_kinds() -> list[str]:
    """The registered dataset kinds, sorted."""
    return sorted(_KINDS)


def dataset_kind(kind: str) -> DatasetKind:
    """The registration of `kind`.

    Raises:
        ValueError: Unknown kind (the message lists the known ones).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; known kinds: {_known()}")
    return _KINDS[kind]


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``"<kind>:<root>[?key=value&...]"``, or ``"<kind>[?key=value&...]"`` for kinds without a folder.

    Raises:
        ValueError: Unknown kind or option, malformed option value, a missing or unexpected folder.
        FileNotFoundError: The root folder does not exist.
    """
    if not isinstance(spec, str):
        raise ValueError(f"a dataset spec is a string such as {DEFAULT_DATASET!r} or 'imagenet:/data/imagenet', got {spec!r}")
    name = spec.split(":", 1)[0].split("?", 1)[0]
    if name not in _KINDS:
        raise ValueError(
            f"unknown dataset {spec!r}; known datasets: {_known()} (<root>: the dataset's folder, e.g. 'imagenet:/data/imagenet')"
        )
    entry = _KINDS[name]
    rest = spec[len(name) :]
    has_root = rest.startswith(":")
    root, query = (rest[1:] if has_root else rest), None
    if "?" in root:
        root, query = root.rsplit("?", 1)
    options = _options(entry, spec, query)
    if not entry.needs_root:
        if has_root:
            raise ValueError(f"dataset spec {spec!r}: the {name} dataset takes no folder; write {name!r}")
        parsed = DatasetSpec(name, None, options)
    else:
        if not root:
            raise ValueError(f"dataset spec {spec!r} names no folder: write '{name}:/path/to/{name}'")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"the {name} folder {path} of dataset spec {spec!r} does not exist; point the spec at the dataset's root"
            )
        parsed = DatasetSpec(name, path, options)
    parsed.transform  # noqa: B018 - validates resize/crop now
    return parsed


def load_split(
    spec: str | DatasetSpec = DEFAULT_DATASET,
    split: str = "train",
    size: int | None = None,
    seed: int = 0,
    *,
    on_error: str = "raise",
) -> ImageDataset:
    """One split of a dataset named by a spec: the seam where datasets plug in.

    Args:
        spec: "cluttered-fashion-mnist" or a dataset on disk, ``"<kind>:<root>"`` (see the module docstring).
        split: "train", "val" or "test". Canvases: "val" holds other canvases of the train items
            (seed ``seed + 1``), "test" canvases of the test items.
        size: Number of images; canvases default to the full standard size (20,000 / 2,000 /
            4,000); datasets on disk keep at most that many, balanced over classes (None: all).
        seed: Seed of the dataset's randomness (on disk: which images a `size` keeps).
        on_error: "raise" (default): an unreadable image raises when it is read. "skip": read every
            image of the split now, leave out those that raise a DataError, list them on stderr with a
            final "N files skipped" line, and keep the list in ``dataset.skipped``
            (:mod:`epviz.data.unreadable`; the split is cut and `size` applied first).

    Raises:
        ValueError: Unknown dataset spec, option, split or `on_error`.
        FileNotFoundError: The root folder of a dataset on disk does not exist.
        DataError: With ``on_error="skip"``, no image of the split can be read.
    """
    check_on_error(on_error)
    parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    entry = dataset_kind(parsed.kind)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {parsed}; use one of {', '.join(SPLITS)}")
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be a positive number of images, got {size}")
    if entry.draws:
        data = _checked(entry, entry.opener(parsed, split, size=None if size is None else int(size), seed=int(seed)))
    else:
        data = _checked(entry, entry.opener(parsed, split))
        if size is not None:
            data = _keep(data, int(size), seed, parsed)
        if on_error == "skip" and len(data):
            data = drop_unreadable(data, f"the {split} split of {parsed}")
    if len(data) == 0:
        raise ValueError(f"the {split} split of {parsed} is empty")
    cast(Any, data).standard_split = split  # which standard split this is (token origins record it: fit warns on a test split)
    return data


def standard_splits(
    spec: str | DatasetSpec, sizes: Mapping[str, int | None], splits: Sequence[str] = SPLITS, *, on_error: str = "raise"
) -> dict[str, ImageDataset]:
    """The standard train / val / test datasets of a spec at the given sizes.

    Args:
        spec: Dataset spec (see :func:`load_split`).
        sizes: Images per split (see :class:`epviz.Setting`).
        splits: Which of "train", "val", "test" to build.
        on_error: "raise" or "skip" unreadable images (see :func:`load_split`).
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; the standard splits are {', '.join(SPLITS)}")
    return {split: load_split(spec, split, sizes.get(split), on_error=on_error) for split in splits}


# --- internals ------------------------------------------------------------------------------


def _known() -> str:
    return ", ".join(_KINDS[k].form for k in dataset_kinds())


def _origin(opener: Callable[..., Any]) -> str:
    return f"{getattr(opener, '__module__', '?')}.{getattr(opener, '__qualname__', repr(opener))}"


def _options(entry: DatasetKind, spec: str, query: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query or "", keep_blank_values=True, strict_parsing=False):
        if key not in entry.options:
            raise ValueError(
                f"unknown option {key!r} in dataset spec {spec!r}; options of {entry.name}: {', '.join(entry.options) or 'none'}"
            )
        convert = entry.options[key]
        try:
            options[key] = convert(value)
        except ValueError as err:
            raise ValueError(f"option {key}={value!r} of {spec!r} must be {getattr(convert, '__name__', convert)}") from err
    return options


def _checked(entry: DatasetKind, data: Any) -> ImageDataset:
    """`data` when it satisfies :class:`~epviz.data.protocol.ImageDataset`, else a TypeError naming what it lacks."""
    missing = missing_members(data)
    if missing:
        raise TypeError(
            f"the {entry.name} dataset kind ({_origin(entry.opener)}) returned a {type(data).__name__}, which lacks "
            f"{', '.join(missing)} of epviz.data.ImageDataset; add them (see epviz/data/protocol.py)"
        )
    return cast(ImageDataset, data)


def _keep(data: ImageDataset, size: int, seed: int, spec: DatasetSpec) -> ImageDataset:
    """At most `size` images of `data`, balanced over classes (:func:`~epviz.data.splits.balanced_subset`)."""
    if isinstance(data, Subsettable):
        return data.subset(balanced_subset(data.labels, size, seed))
    if size >= len(data):
        return data
    raise TypeError(
        f"the {spec.kind} dataset ({type(data).__name__}) has no subset(indices) method, so size={size} cannot "
        f"keep fewer of its {len(data)} images; give it one (see epviz.data.splits.Subsettable) or pass size=None"
    )
