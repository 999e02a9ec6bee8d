"""The shared experimental set-up of the notebooks: datasets, token caches, probe budget.

Every notebook builds its data through this module, so that they all use the same
datasets at the same sizes and read the same token caches: tokens are extracted once per
backbone and split, for *every* block, and the layer sweep and the last-block analyses
reuse that one extraction.

The standard sets (cluttered Fashion-MNIST by default):

========  ==========================  =========  ========
split     canvases                    full size  fast size
========  ==========================  =========  ========
train     Fashion-MNIST train, seed 0     20,000     2,000
val       Fashion-MNIST train, seed 1      2,000       500
test      Fashion-MNIST test,  seed 0      4,000       500
========  ==========================  =========  ========

``val`` holds other canvases of the training items (another seed) and selects the best
epoch; ``test`` is only ever used for the numbers that are reported.

Datasets on disk plug in through the same seam, as a spec ``"<kind>:<root>"`` (see
:mod:`epviz.data.specs` for the layouts, the options and how each split is formed)::

    DATASET = "imagenet:/data/imagenet"     # train/ + val/ (val is the reported test split)
    DATASET = "cub:/data/CUB_200_2011"      # train_test_split.txt
    DATASET = "pets:/data/oxford-iiit-pet"  # trainval.txt / test.txt
    DATASET = "imagefolder:/data/images"    # train/ [val/] [test/] of class folders, or class folders only

Their images get the reference evaluation transform (Resize 256 + CenterCrop 224,
bicubic). ``val`` is held out from the training images (10% of each class, fixed seed)
unless the dataset has a validation set besides its test set, and ``test`` is the
official evaluation set. The standard sizes above are then upper bounds: a split keeps at
most that many images, spread evenly over the classes (``size=None``: all of them).

The standard probe budget (cached tokens, no augmentation): AdamW, lr 1e-3, weight decay
1e-4 on matrices, linear warm-up then cosine decay, best epoch on ``val``; 15 epochs
(2 of warm-up) in batches of 256 under bf16 autocast, or in fast mode 5 epochs (1 of
warm-up) in batches of 64 in fp32 (more, smaller steps for the same compute on the small
training set). Trained probes are stored in the probe cache (:mod:`epviz.probe_cache`),
so a notebook that needs a probe another notebook trained loads it instead.

Fast mode (``EPVIZ_FAST=1``) shrinks sizes and budgets so that every notebook runs in a
minute or two on a laptop CPU; its numbers are for checking the pipeline, not for reading.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from epviz import zoo
from epviz.analysis.ablation import uniform_ablation
from epviz.analysis.efficiency import efficiency
from epviz.analysis.entropy import entropy
from epviz.analysis.localization import THRESHOLDS, localization
from epviz.backbones import Backbone, load_backbone
from epviz.data.cluttered import ClutteredFashionMNIST
from epviz.evaluate import accuracy
from epviz.probes.base import Probe
from epviz.probe_cache import fit_or_load
from epviz.probes.registry import build, probe_class
from epviz.tokens import TokenCache, extract_tokens
from epviz.tokenset import TokenSet
from epviz.train import FitResult

__all__ = [
    "DEFAULT_DATASET", "DATASETS", "SPLITS", "FULL_SIZES", "FAST_SIZES", "FAST_PROBES", "EP_QUERIES", "EP_VARIANTS",
    "is_fast", "set_sizes", "load_dataset", "standard_sets", "present_backbones", "zoo_caches", "zoo_tokens",
    "budget", "low_shot_budget", "probe_specs", "train_probe", "probe_zoo", "probe_costs", "predictor_table",
    "predictor_tables", "localization_thresholds",
]

DEFAULT_DATASET = "cluttered-fashion-mnist"
DATASETS = (DEFAULT_DATASET, "imagenet:<root>", "cub:<root>", "pets:<root>", "imagefolder:<root>")
SPLITS = ("train", "val", "test")
FULL_SIZES = {"train": 20_000, "val": 2_000, "test": 4_000}
FAST_SIZES = {"train": 2_000, "val": 500, "test": 500}
_SOURCES = {"train": ("train", 0), "val": ("train", 1), "test": ("test", 0)}  # split -> (item split, seed)

FAST_PROBES = ("cls", "gap", "ep", "mhca", "simpool", "cbam")
EP_QUERIES = 16  # D = 192 must be divisible by d_out * M for d_out in (1, 2, 4)
EP_VARIANTS = {f"ep_d{d}": {"name": "ep", "num_queries": EP_QUERIES, "d_out": d} for d in (1, 2, 4)}


def is_fast() -> bool:
    """Whether fast mode is on (``EPVIZ_FAST=1``)."""
    return os.environ.get("EPVIZ_FAST", "0") == "1"


def set_sizes(fast: bool) -> dict[str, int]:
    """Number of images of each standard split."""
    return dict(FAST_SIZES if fast else FULL_SIZES)


def load_dataset(spec: str = DEFAULT_DATASET, split: str = "train", size: int | None = None, seed: int = 0):
    """One dataset from a dataset spec: the seam where other datasets plug in.

    Args:
        spec: "cluttered-fashion-mnist" or a dataset on disk, ``"<kind>:<root>"`` with kind
            imagenet, cub, pets or imagefolder; see :data:`DATASETS` and :mod:`epviz.data.specs`.
        split: "train", "val" or "test". Canvases: "val" holds other canvases of the train
            items (seed ``seed + 1``), "test" canvases of the test items. Datasets on disk:
            see the module docstring.
        size: Number of images (default: the full standard size of the split); for datasets
            on disk at most that many, balanced over classes (None: every image).
        seed: Seed of the dataset's randomness (on disk: which images a `size` keeps).

    Raises:
        ValueError: Unknown dataset spec, option or split.
        FileNotFoundError: The root folder of a dataset on disk does not exist.
    """
    from epviz.data import specs

    if isinstance(spec, str) and specs.is_spec(spec):
        return specs.open_split(spec, split, size, seed)
    if spec not in DATASETS:
        raise ValueError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASETS)} "
                         f"(<root>: the dataset's folder, e.g. 'imagenet:/data/imagenet')")
    if split not in _SOURCES:
        raise ValueError(f"unknown split {split!r} of {spec}; use one of {', '.join(_SOURCES)}")
    source, offset = _SOURCES[split]
    size = FULL_SIZES[split] if size is None else int(size)
    return ClutteredFashionMNIST(source, size, seed=seed + offset)


def standard_sets(fast: bool, dataset: str = DEFAULT_DATASET, splits: Sequence[str] = SPLITS) -> dict:
    """The standard train / val / test sets (see the module docstring for sizes and seeds).

    Args:
        fast: Small sizes (fast mode) instead of the full ones (upper bounds for datasets on disk).
        dataset: Dataset spec (see :func:`load_dataset`), e.g. "imagenet:/data/imagenet".
        splits: Which of "train", "val", "test" to build.
    """
    sizes = set_sizes(fast)
    unknown = [s for s in splits if s not in sizes]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; the standard splits are {', '.join(SPLITS)}")
    return {split: load_dataset(dataset, split, sizes[split]) for split in splits}


def present_backbones(names: Iterable[str]) -> list[str]:
    """The backbones of `names` that can be loaded now: zoo models whose weights file and model
    card exist (``tiny-random`` always), and every non-zoo name (timm models are checked when loaded).

    A zoo backbone without weights is left out with a warning.
    """
    out = []
    for name in names:
        if name in zoo.ZOO and name != "tiny-random":
            files = (zoo.zoo_weights(name), zoo.zoo_weights(name).with_suffix(".json"))
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                warnings.warn(f"{name} is left out: {', '.join(missing)} missing (scripts/train_zoo.py makes them)", stacklevel=2)
                continue
        out.append(name)
    return out


def _as_backbone(backbone: str | Backbone) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else load_backbone(backbone)


def zoo_caches(
    backbones: Iterable[str | Backbone],
    fast: bool,
    *,
    sets: Mapping | None = None,
    splits: Sequence[str] = SPLITS,
    dataset: str = DEFAULT_DATASET,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, TokenCache]]:
    """Token caches of every block, per backbone and split (extracted once, then cache hits).

    Args:
        backbones: Backbone names (or loaded backbones).
        fast: Fast-mode sizes.
        sets: The datasets per split (default :func:`standard_sets`).
        splits: Splits to extract.
        dataset: Dataset spec when `sets` is not given.
        batch_size: Images per backbone pass.
        progress: Show extraction progress bars.

    Returns:
        ``{backbone name: {split: TokenCache}}``; every cache holds all blocks.
    """
    sets = standard_sets(fast, dataset, splits) if sets is None else sets
    missing = [s for s in splits if s not in sets]
    if missing:
        raise ValueError(f"no dataset given for splits {missing}")
    out: dict[str, dict[str, TokenCache]] = {}
    for backbone in backbones:
        bb = _as_backbone(backbone)
        out[bb.name] = {split: extract_tokens(bb, sets[split], layers=None, batch_size=batch_size, progress=progress)
                        for split in splits}
    return out


def zoo_tokens(
    backbones: Iterable[str | Backbone],
    layer: int = -1,
    fast: bool = False,
    *,
    sets: Mapping | None = None,
    splits: Sequence[str] = SPLITS,
    dataset: str = DEFAULT_DATASET,
    in_memory: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, TokenSet]]:
    """The tokens of one block per backbone and split, read from the all-block caches.

    Args:
        backbones: Backbone names (or loaded backbones).
        layer: Block index (0 = first, -1 = last).
        fast: Fast-mode sizes.
        sets: The datasets per split (default :func:`standard_sets`).
        splits: Splits to return.
        dataset: Dataset spec when `sets` is not given.
        in_memory: Load the tokens into RAM (else memory maps).
        progress: Show extraction progress bars.

    Returns:
        ``{backbone name: {split: TokenSet}}``.
    """
    caches = zoo_caches(backbones, fast, sets=sets, splits=splits, dataset=dataset, progress=progress)
    return {name: {split: cache.tokens(layer, in_memory=in_memory) for split, cache in per_split.items()}
            for name, per_split in caches.items()}


def budget(fast: bool, **overrides) -> dict:
    """The standard probe budget as :func:`epviz.fit` keyword arguments (overrides win)."""
    base = dict(epochs=5 if fast else 15, batch_size=64 if fast else 256, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
                warmup_epochs=1 if fast else 2, precision="fp32" if fast else "bf16")
    base.update(overrides)
    return base


def low_shot_budget(fast: bool, **overrides) -> dict:
    """The probe budget of low-shot runs: more epochs, since a few images make one step per epoch.

    100 epochs (10 of warm-up), or 40 (4 of warm-up) in fast mode; otherwise as :func:`budget`.
    """
    return budget(fast, **{"epochs": 40 if fast else 100, "warmup_epochs": 4 if fast else 10, **overrides})


def probe_specs(probes: str | Sequence[str] | Mapping[str, Mapping | None]) -> dict[str, dict]:
    """Probe specs as ``{label: build options}``; the options' ``name`` is the registry name.

    Args:
        probes: Registry names (``"ep"`` gets ``num_queries=EP_QUERIES``), or a mapping
            label -> options, e.g. ``{"ep_d2": {"name": "ep", "d_out": 2}}``.

    Raises:
        ValueError: An unknown probe name.
    """
    if isinstance(probes, str):
        probes = [probes]
    if not isinstance(probes, Mapping):
        probes = {p: ({"num_queries": EP_QUERIES} if p in ("ep", "ep_all") else {}) for p in probes}
    specs = {}
    for label, options in probes.items():
        options = dict(options or {})
        options.setdefault("name", label)
        probe_class(options["name"])  # unknown names fail before any training
        specs[str(label)] = options
    if not specs:
        raise ValueError("no probes given")
    return specs


def _build(name: str, tokens: TokenSet, num_classes: int, seed: int, options: dict) -> Probe:
    options = dict(options)
    if "grid" not in options and "grid" in inspect.signature(probe_class(name).__init__).parameters:
        options["grid"] = tokens.grid
    return build(name, tokens.dim, num_classes, seed=seed, **options)


def train_probe(
    name: str,
    train: TokenSet,
    val: TokenSet,
    fast: bool,
    *,
    seed: int = 0,
    fit_options: Mapping | None = None,
    cache: bool = True,
    **options,
) -> FitResult:
    """Build a probe and train it with the standard budget, the best epoch picked on `val`.

    A run on tokens read from token caches is stored in the probe cache
    (:mod:`epviz.probe_cache`) and loaded from there when it is asked for again.

    Args:
        name: Registry name of the probe.
        train: Training tokens.
        val: Validation tokens (epoch selection).
        fast: Fast-mode budget.
        seed: Seed of the initialisation and of the shuffling.
        fit_options: Overrides of the budget (see :func:`budget`).
        cache: Read and write the probe cache (False: always train, store nothing).
        **options: Build options of the probe (``num_queries``, ``d_out``, ``heads``, ...).
    """
    num_classes = max(int(train.num_classes), int(val.num_classes))
    fit_kwargs = budget(fast, **dict(fit_options or {}))
    probe = _build(name, train, num_classes, seed, options)
    return fit_or_load(probe, train, val, seed=seed, cache=cache, **fit_kwargs)


def probe_zoo(
    tokens: Mapping[str, Mapping[str, TokenSet]],
    probes: str | Sequence[str] | Mapping[str, Mapping | None],
    fast: bool,
    *,
    seed: int = 0,
    fit_options: Mapping | None = None,
) -> tuple[pd.DataFrame, dict[tuple[str, str], Probe]]:
    """Train every probe on every backbone's tokens; report val and test top-1.

    Args:
        tokens: ``{backbone: {"train": ..., "val": ..., "test": ...}}`` (see :func:`zoo_tokens`).
        probes: Probe specs (see :func:`probe_specs`).
        fast: Fast-mode budget.
        seed: Seed of every run.
        fit_options: Overrides of the budget.

    Returns:
        A tidy table, one row per backbone x probe (backbone, layer, probe, name, seed, params,
        val_acc, test_acc, best_epoch, seconds of training, cached: loaded from the probe cache),
        and the trained probes keyed by (backbone, label).
    """
    specs = probe_specs(probes)
    rows, fitted = [], {}
    for backbone, split in tokens.items():
        for label, options in specs.items():
            options = dict(options)
            name = options.pop("name")
            result = train_probe(name, split["train"], split["val"], fast, seed=seed, fit_options=fit_options, **options)
            test = accuracy(result.probe, split["test"], topk=(1,))["top1"]
            fitted[backbone, label] = result.probe
            rows.append(dict(backbone=backbone, layer=split["train"].info.get("layer"), probe=label, name=name, seed=seed,
                             params=sum(p.numel() for p in result.probe.parameters() if p.requires_grad),
                             predictors=result.probe.num_predictors, val_acc=result.best_acc, test_acc=test,
                             best_epoch=result.best_epoch, seconds=result.seconds, cached="cached" in result.config))
    return pd.DataFrame(rows), fitted


def probe_costs(
    probes: str | Sequence[str] | Mapping[str, Mapping | None],
    backbone: str | Backbone,
    num_classes: int,
    *,
    measure_speed: bool = False,
) -> pd.DataFrame:
    """Trainable parameters, FLOPs (and optionally throughput) of each probe on a backbone's tokens.

    Args:
        probes: Probe specs (see :func:`probe_specs`).
        backbone: The backbone whose token count, width and FLOPs apply.
        num_classes: Number of classes C (the classifier's size counts).
        measure_speed: Also measure throughput (a timing run; NaN otherwise).

    Returns:
        One row per probe, the columns of :func:`epviz.analysis.efficiency` with ``backbone``.
    """
    bb = _as_backbone(backbone)
    specs = probe_specs(probes)
    dummy = TokenSet(patch=np.zeros((1, bb.num_patches, bb.dim), np.float32), prefix=None, labels=np.zeros(1), grid=bb.grid)
    built = {}
    for label, options in specs.items():
        options = dict(options)
        built[label] = _build(options.pop("name"), dummy, num_classes, 0, options)
    return efficiency(built, backbone=bb, measure_speed=measure_speed, context={"backbone": bb.name})


def localization_thresholds(fast: bool) -> np.ndarray:
    """MaxBoxAccV2 thresholds: 0, 0.01, ..., 0.99; in fast mode every fourth one (step 0.04)."""
    return THRESHOLDS[::4] if fast else THRESHOLDS


def predictor_table(
    probe: Probe,
    tokens: TokenSet,
    dataset,
    *,
    context: Mapping | None = None,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """One row per attention predictor: its accuracy drop when made uniform, its localization and entropy.

    Args:
        probe: A trained attentive probe.
        tokens: Evaluation tokens of `dataset`'s images, in order.
        dataset: The images with their GT boxes.
        context: Values of the context columns (backbone, layer, probe, seed, ...).
        index: Optional subset of images.
        localization_index: Images of the localization measure, if other than `index`
            (MaxBoxAccV2 is the costly measure).
        thresholds: MaxBoxAccV2 thresholds (default 0..0.99 step 0.01).

    Returns:
        The columns of :func:`~epviz.analysis.uniform_ablation` (delta_acc, ...), of
        :func:`~epviz.analysis.localization` (maxboxacc_v2, inbox_mass, chance_mass, pointing, ...)
        and of :func:`~epviz.analysis.entropy` (entropy, entropy_norm, ...), merged on the
        context columns and ``predictor``.
    """
    index = None if index is None else np.asarray(list(index), dtype=np.int64)
    loc_index = index if localization_index is None else np.asarray(list(localization_index), dtype=np.int64)
    ablation = uniform_ablation(probe, tokens, context=context, index=index)
    keys = [c for c in ablation.columns if c not in ("acc_full", "acc_uniform", "delta_acc", "n_images")]
    loc = localization(probe, tokens, dataset, context=context, index=loc_index, thresholds=thresholds)
    loc = loc.rename(columns={"n_images": "n_images_localization"})
    ent = entropy(probe, tokens, context=context, index=index)
    table = ablation.merge(loc, on=keys).merge(ent.drop(columns=["n_images"]), on=keys)
    table["predictors"] = probe.num_predictors
    if len(table) != probe.num_predictors:
        raise RuntimeError(f"expected {probe.num_predictors} predictor rows, got {len(table)}")
    if table["delta_acc"].isna().any() or not np.isfinite(table["delta_acc"]).all():
        raise RuntimeError("a predictor has no accuracy drop")
    return table


def predictor_tables(
    fitted: Mapping[tuple[str, str], Probe],
    tokens: Mapping[str, Mapping[str, TokenSet]],
    dataset,
    *,
    split: str = "test",
    seed: int = 0,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """:func:`predictor_table` of every attentive probe in `fitted`, as one table.

    Args:
        fitted: Trained probes keyed by (backbone, label), as returned by :func:`probe_zoo`;
            probes without attention predictors are skipped.
        tokens: ``{backbone: {split: TokenSet}}``.
        dataset: The images of the `split` tokens, with GT boxes.
        split: Which split's tokens to measure on.
        seed: Value of the ``seed`` column.
        index: Optional subset of images.
        localization_index: Images of the localization measure, if other than `index`.
        thresholds: MaxBoxAccV2 thresholds.
    """
    parts = []
    for (backbone, label), probe in fitted.items():
        if probe.num_predictors == 0:
            continue
        ts = tokens[backbone][split]
        context = dict(backbone=backbone, layer=ts.info.get("layer"), probe=label, seed=seed)
        parts.append(predictor_table(probe, ts, dataset, context=context, index=index,
                                     localization_index=localization_index, thresholds=thresholds))
    if not parts:
        raise ValueError("none of the probes has attention predictors: use attentive probes (e.g. ep, mhca)")
    return pd.concat(parts, ignore_index=True)
