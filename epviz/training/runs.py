"""Many probe trainings, one tidy table: the probe zoo, layer sweeps and low-shot budgets.

Every run builds a fresh probe (seeded), trains it with :func:`epviz.fit` and reports its
validation top-1. Results are tidy: one row per probe x layer (or shots) x seed, with the number
of classes (``num_classes``, whose inverse is the chance accuracy the figures draw).
:func:`aggregate_runs` and :func:`seed_summary` give the mean and sample standard deviation over seeds.

Low-shot sampling (ours): for k shots and a seed, k training images are drawn without
replacement from every class present in the training labels, with
``numpy.random.default_rng(seed)``; the same (k, seed) gives the same images to every probe.
Runs on whole token caches are stored in (and read back from) the probe cache
(:mod:`epviz.training.probe_cache`); low-shot subsets are always trained afresh.
The batch size of a low-shot run is ``min(batch_size, k * classes)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from epviz.analysis.intervals import bootstrap_weights, percentile_interval, weighted_mean
from epviz.checks import check_int, check_sequence
from epviz.evaluate import KNN_FEATURES, check_labels, knn_predictions, predict
from epviz.probes import Probe, accepted_options, build, probe_specs, trainable_params
from epviz.tables import context_columns
from epviz.tokens import TokenSet
from epviz.training.fit import FitResult
from epviz.training.probe_cache import fit_or_load

__all__ = [
    "aggregate_runs",
    "build_for",
    "layer_sweep",
    "low_shot",
    "probe_zoo",
    "sample_per_class",
    "seed_summary",
    "train_probe",
]


_SEED = partial(check_int, low=0)


def build_for(name: str, tokens: TokenSet, num_classes: int, seed: int, options: Mapping | None = None) -> Probe:
    """Build probe `name` for `tokens` (their width, and their grid where the probe takes one)."""
    options = dict(options or {})
    if "grid" not in options and "grid" in accepted_options(name):
        options["grid"] = tokens.grid
    return build(name, tokens.dim, num_classes, seed=seed, **options)


def _num_classes(*sets: TokenSet) -> int:
    return max(int(cast(int, s.num_classes)) for s in sets)  # TokenSet.__post_init__ always sets num_classes


def train_probe(
    name: str,
    train: TokenSet,
    val: TokenSet,
    *,
    budget: Mapping,
    seed: int = 0,
    cache: bool = True,
    device=None,
    **options,
) -> FitResult:
    """Build a probe and train it with a budget, the best epoch picked on `val`.

    A run on tokens read from token caches is stored in the probe cache
    (:mod:`epviz.training.probe_cache`) and loaded from there when it is asked for again.

    Args:
        name: Registered name of the probe (a family or a variant).
        train: Training tokens.
        val: Validation tokens (epoch selection).
        budget: :func:`epviz.fit` options (e.g. ``Setting.fit_options()``).
        seed: Seed of the initialisation and of the shuffling.
        cache: Read and write the probe cache (False: always train, store nothing).
        device: Where to train (None: automatic).
        **options: Build options of the probe (``num_queries``, ``d_out``, ``heads``, ...).
    """
    probe = build_for(name, train, _num_classes(train, val), seed, options)
    return fit_or_load(probe, train, val, seed=seed, cache=cache, device=device, **dict(budget))


def probe_zoo(
    tokens: Mapping[str, Mapping[str, TokenSet]],
    probes: str | Sequence[str] | Mapping[str, Mapping | None],
    *,
    budget: Mapping,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    chosen: pd.DataFrame | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[tuple, Probe]]:
    """Train every probe on every backbone's tokens, once per seed; report val and test top-1.

    Args:
        tokens: ``{backbone: {"train": ..., "val": ..., "test": ...}}`` (see :func:`epviz.tokens.layer_tokens`).
        probes: Probe specs (see :func:`epviz.probes.probe_specs`).
        budget: :func:`epviz.fit` options, or with ``grid`` a tuning budget (``Setting.fit_options()``).
        seed: Seed of every run when `seeds` is None.
        seeds: One run per seed (initialisation and shuffling); default ``(seed,)``.
        chosen: Runs of an earlier call (its rows with ``backbone``, ``probe``, ``lr`` and
            ``weight_decay``): each (backbone, probe) is then trained at the learning rate and weight
            decay chosen there, without a grid. Repeating the tuned configuration under other seeds
            measures the spread over initialisation and shuffling at the price of one fit per seed.
        progress: Show a tqdm bar over runs.

    Returns:
        A tidy table, one row per backbone x probe x seed (backbone, layer, probe, name, seed, params,
        predictors, num_classes, val_acc, test_acc (with test_acc_lo / test_acc_hi: its 95% bootstrap interval
        over test images, :func:`held_out_scores`; ece, ece_lo, ece_hi: its expected calibration error; knn_cls, knn_gap: the backbone's k-NN top-1, :func:`knn_scores`),
        best_epoch, lr and weight_decay of the run (the grid point chosen
        on val when the budget holds a grid; every point's val curve is in the run's ``grid_history``),
        tuned, seconds of training, cached: loaded from the probe cache, probe_cache: the run's key in the probe
        cache, train_tokens: its token cache), and the trained probes keyed
        by (backbone, label) with a single seed, by (backbone, label, seed) with several. The test
        split is evaluated once per run, for the chosen grid point only. :func:`seed_summary` gives
        mean ± std over the seeds.
    """
    specs = probe_specs(probes)
    seeds = check_sequence("seeds", (seed,) if seeds is None else seeds, _SEED, unique=True)
    rows, fitted = [], {}
    bar = tqdm(total=len(tokens) * len(specs) * len(seeds), desc="probe zoo", disable=not progress)
    for backbone, split in tokens.items():
        knn = knn_scores(split["train"], split["test"])
        for label, options in specs.items():
            options = dict(options)
            name = options.pop("name")
            run_budget = budget if chosen is None else _chosen_budget(budget, chosen, backbone, label)
            for run_seed in seeds:
                bar.set_postfix(backbone=backbone, probe=label, seed=run_seed)
                result = train_probe(name, split["train"], split["val"], budget=run_budget, seed=run_seed, **options)
                test = held_out_scores(result.probe, split["test"])
                fitted[(backbone, label) if len(seeds) == 1 else (backbone, label, run_seed)] = result.probe
                rows.append(
                    dict(
                        backbone=backbone,
                        layer=split["train"].origin.layer,
                        probe=label,
                        name=name,
                        seed=run_seed,
                        params=trainable_params(result.probe),
                        predictors=result.probe.num_predictors,
                        num_classes=int(result.probe.num_classes),
                        val_acc=result.best_acc,
                        **test,
                        **knn,
                        best_epoch=result.best_epoch,
                        lr=result.config.get("lr"),
                        weight_decay=result.config.get("weight_decay"),
                        tuned="grid" in result.config,
                        seconds=result.seconds,
                        cached="cached" in result.config,
                        probe_cache=result.config.get("probe_cache"),
                        train_tokens=split["train"].origin.cache,
                    )
                )
                bar.update()
    bar.close()
    return pd.DataFrame(rows), fitted


def knn_scores(train: TokenSet, test: TokenSet, k: int = 20) -> dict[str, float]:
    """Test top-1 of cosine k-NN (:func:`epviz.evaluate.knn_predictions`, k = 20) on [CLS] (``knn_cls``; NaN
    without prefix tokens) and on the mean patch token (``knn_gap``): a non-parametric reader of the same tokens."""
    found = knn_predictions(train, test, k)
    return {f"knn_{f}": float(found[f].hits().mean()) if f in found else math.nan for f in KNN_FEATURES}


def held_out_scores(probe: Probe, test: TokenSet, bins: int = 15) -> dict[str, float]:
    """Test top-1 and expected calibration error (`bins` equal-width confidence bins) of `probe`, each with its 95%
    bootstrap interval over the test images (one pass of the probe, the same resamples for both)."""
    check_labels(test.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    out = predict(probe, test)
    correct, gaps = (out.preds == out.labels).astype(np.float64), out.calibration_gaps(bins)
    top1, ece = [], []
    for weights in bootstrap_weights(len(correct)):
        top1.append(weighted_mean(weights, correct))
        ece.append(np.abs(weighted_mean(weights, gaps)).sum(axis=1))
    (top1_lo, top1_hi), (ece_lo, ece_hi) = (percentile_interval(np.concatenate(s)) for s in (top1, ece))
    return dict(
        test_acc=float(correct.mean()),
        test_acc_lo=float(top1_lo),
        test_acc_hi=float(top1_hi),
        ece=float(np.abs(gaps.mean(axis=0)).sum()),
        ece_lo=float(ece_lo),
        ece_hi=float(ece_hi),
    )


def _chosen_budget(budget: Mapping, chosen: pd.DataFrame, backbone: str, label: str) -> dict:
    """`budget` without its grid, at the lr and weight decay chosen for (backbone, label) in `chosen`."""
    missing = sorted({"backbone", "probe", "lr", "weight_decay"} - set(chosen.columns))
    if missing:
        raise ValueError(f"chosen runs need the columns backbone, probe, lr and weight_decay; missing {missing}")
    match = chosen[(chosen["backbone"] == backbone) & (chosen["probe"] == label)]
    if match.empty:
        raise ValueError(f"no chosen configuration for probe {label!r} on {backbone!r}: train it with the grid first")
    configs = match[["lr", "weight_decay"]].drop_duplicates()
    if len(configs) > 1:
        raise ValueError(f"probe {label!r} on {backbone!r} has {len(configs)} chosen configurations; pass one run per probe")
    lr, weight_decay = (float(v) for v in configs.iloc[0])
    return {**{k: v for k, v in budget.items() if k != "grid"}, "lr": lr, "weight_decay": weight_decay}


def _specs_list(probes) -> list[tuple[str, str, dict]]:
    out = []
    for label, options in probe_specs(probes).items():
        options = dict(options)
        out.append((label, options.pop("name"), options))
    return out


def _train_one(
    label: str,
    name: str,
    options: dict,
    train: TokenSet,
    val: TokenSet,
    seed: int,
    epochs: int,
    batch_size: int,
    device,
    fit_kwargs: dict,
) -> dict:
    probe = build_for(name, train, _num_classes(train, val), seed, options)
    result = fit_or_load(probe, train, val, seed=seed, device=device, epochs=epochs, batch_size=batch_size, **fit_kwargs)
    return dict(
        best_acc=result.best_acc,
        final_acc=result.final_acc,
        best_epoch=result.best_epoch,
        epochs_run=int(result.history["epoch"].iloc[-1]),
        params=trainable_params(result.probe),
        lr=result.config.get("lr"),
        weight_decay=result.config.get("weight_decay"),
        n_train=len(train),
        num_classes=int(result.probe.num_classes),
        seconds=result.seconds,
    )


def _cache_layers(cache) -> list[int]:
    if isinstance(cache, Mapping):
        return list(cache)
    return list(cache.layers)


def _cache_tokens(cache, layer: int, in_memory: bool) -> TokenSet:
    if isinstance(cache, Mapping):
        return cache[layer]
    return cache.tokens(layer, in_memory=in_memory)


def layer_sweep(
    cache_train,
    cache_val,
    probes: Sequence[str] | Mapping[str, Mapping] = ("cls", "gap", "ep"),
    layers: Iterable[int] | None = None,
    *,
    seeds: Iterable[int] = (0,),
    epochs: int = 90,
    batch_size: int = 256,
    in_memory: bool = False,
    device: str | torch.device | None = None,
    context: Mapping | None = None,
    progress: bool = True,
    **fit_kwargs,
) -> pd.DataFrame:
    """Train every probe on the tokens of every cached block (one extraction, many layers).

    Args:
        cache_train: Training tokens: a :class:`~epviz.TokenCache` (``.layers``, ``.tokens(layer)``)
            or a dict layer -> TokenSet.
        cache_val: Validation tokens of the same layers.
        probes: Registry names, or a mapping label -> build options (``name`` selects the registry
            name, e.g. ``{"ep_d2": {"name": "ep", "d_out": 2}}``).
        layers: Blocks to sweep (default: every layer of `cache_train`).
        seeds: One run per seed (probe initialisation and shuffling).
        epochs: Epochs per run.
        batch_size: Batch size per run.
        in_memory: Load each layer's tokens into RAM before training.
        device: Where to train; None picks automatically.
        context: Values of the context columns (``backbone`` defaults to the tokens' origin).
        progress: Show a tqdm bar over runs.
        **fit_kwargs: Passed to :func:`epviz.fit` (optimizer, lr, weight_decay, warmup_epochs, ...).

    Returns:
        One row per probe x layer x seed: backbone, layer, probe, seed, best_acc, final_acc,
        best_epoch, epochs_run, params, n_train, seconds.
    """
    specs = _specs_list(probes)
    available = _cache_layers(cache_train)
    layers = available if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ValueError(f"layers {missing} are not in the training cache (it holds {available})")
    missing_val = [layer for layer in layers if layer not in _cache_layers(cache_val)]
    if missing_val:
        raise ValueError(f"layers {missing_val} are not in the validation cache (it holds {_cache_layers(cache_val)})")
    seeds = check_sequence("seeds", seeds, _SEED, unique=True)
    rows = []
    bar = tqdm(total=len(specs) * len(layers) * len(seeds), desc="layer sweep", disable=not progress)
    for layer in layers:
        train, val = _cache_tokens(cache_train, layer, in_memory), _cache_tokens(cache_val, layer, in_memory)
        for label, name, options in specs:
            for seed in seeds:
                bar.set_postfix(layer=layer, probe=label, seed=seed)
                ctx = context_columns(dict(context or {}, layer=layer, seed=seed), label, train)
                rows.append({**ctx, **_train_one(label, name, options, train, val, seed, epochs, batch_size, device, fit_kwargs)})
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def sample_per_class(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` samples of every class present in `labels`, drawn with `seed` (sorted).

    Raises:
        ValueError: `shots` exceeds the size of the smallest class.
    """
    labels = np.asarray(labels)
    shots = check_int("shots (images per class)", shots, 1)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        raise ValueError("there are no training labels to sample from")
    smallest = int(counts.argmin())
    if shots > counts[smallest]:
        raise ValueError(
            f"{shots} shots per class needs at least {shots} training images of every class, but class "
            f"{classes[smallest]} has only {counts[smallest]}; use shots <= {counts[smallest]}"
        )
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=shots, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def low_shot(
    train_tokens: TokenSet,
    val_tokens: TokenSet,
    shots: Iterable[int] = (1, 2, 5, 10, 25, 50, 100),
    seeds: Iterable[int] = (0, 1, 2),
    probes: Sequence[str] | Mapping[str, Mapping] = ("cls", "gap", "ep"),
    *,
    epochs: int = 90,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    context: Mapping | None = None,
    progress: bool = True,
    tune_every_seed: bool = False,
    **fit_kwargs,
) -> pd.DataFrame:
    """Train every probe on k images per class, for every k and seed.

    With a tuning grid in `fit_kwargs` (``grid=...``, see :mod:`epviz.training.tuning`), the first
    seed of every (k, probe) trains the grid and the other seeds train once at the learning rate and
    weight decay it chose on val (as :func:`probe_zoo`'s ``chosen``): the spread over seeds is then
    the spread of one configuration over samples, initialisations and shuffles, at a third of the
    cost of three grids. ``tune_every_seed=True`` trains the grid for every seed instead.

    Args:
        train_tokens: The full training tokens to sample from.
        val_tokens: Validation tokens (always the full set).
        shots: Images per class.
        seeds: One sample and one run per seed (sampling, initialisation and shuffling).
        probes: Registry names, or a mapping label -> build options (see :func:`layer_sweep`).
        epochs: Epochs per run.
        batch_size: Largest batch size; a run uses ``min(batch_size, its number of images)``.
        device: Where to train; None picks automatically.
        context: Values of the context columns (defaults from ``train_tokens.origin``).
        progress: Show a tqdm bar over runs.
        tune_every_seed: With a grid, train it for every seed (default: for the first seed only).
        **fit_kwargs: Passed to :func:`epviz.fit` (or, with ``grid``, to :func:`~epviz.training.tuning.tune`).

    Returns:
        One row per probe x shots x seed: backbone, layer, probe, seed, shots, best_acc, final_acc,
        best_epoch, epochs_run, params, lr, weight_decay, tuned (this run trained the grid), n_train,
        seconds. Aggregate with :func:`aggregate_runs`.
    """
    specs = _specs_list(probes)
    shots = check_sequence("shots", shots, partial(check_int, low=1), unique=True)
    seeds = check_sequence("seeds", seeds, _SEED, unique=True)
    for k in shots:  # fail before any training
        sample_per_class(train_tokens.labels, k, 0)
    rows = []
    chosen: dict[tuple[int, str], dict] = {}  # (k, label) -> the first seed's choice, when only it is tuned
    bar = tqdm(total=len(specs) * len(shots) * len(seeds), desc="low-shot", disable=not progress)
    for k in shots:
        for seed in seeds:
            subset = train_tokens.subset(sample_per_class(train_tokens.labels, k, seed))
            for label, name, options in specs:
                bar.set_postfix(shots=k, probe=label, seed=seed)
                ctx = context_columns(dict(context or {}, seed=seed), label, train_tokens)
                kwargs = fit_kwargs
                if fit_kwargs.get("grid") is not None and not tune_every_seed and (k, label) in chosen:
                    kwargs = {**{key: v for key, v in fit_kwargs.items() if key != "grid"}, **chosen[k, label]}
                run = _train_one(
                    label, name, options, subset, val_tokens, seed, epochs, min(batch_size, len(subset)), device, kwargs
                )
                if fit_kwargs.get("grid") is not None:
                    chosen.setdefault((k, label), {"lr": run["lr"], "weight_decay": run["weight_decay"]})
                rows.append({**ctx, "shots": k, **run, "tuned": kwargs.get("grid") is not None})
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def aggregate_runs(
    runs: pd.DataFrame,
    by: Sequence[str] | None = None,
    values: Sequence[str] = ("best_acc", "final_acc"),
) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds.

    Args:
        runs: Rows from :func:`layer_sweep` or :func:`low_shot`.
        by: Grouping columns; default the present ones among backbone, layer, probe, shots.
        values: Columns to aggregate.

    Returns:
        One row per group: the `by` columns, ``<value>_mean``, ``<value>_std`` (NaN for a single
        run) and ``runs``.
    """
    if by is None:
        by = [c for c in ("backbone", "layer", "probe", "shots") if c in runs.columns]
    missing = [c for c in [*by, *values] if c not in runs.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the runs (columns: {list(runs.columns)})")
    grouped = runs.groupby(list(by), dropna=False, sort=True)
    out = grouped[list(values)].agg(["mean", "std"])
    out.columns = [f"{v}_{stat}" for v, stat in out.columns]
    out["runs"] = grouped.size()
    return out.reset_index()


def seed_summary(
    runs: pd.DataFrame,
    by: Sequence[str] = ("backbone", "probe"),
    values: Sequence[str] = ("val_acc", "test_acc", "ece"),
) -> pd.DataFrame:
    """Mean ± sample standard deviation over seeds, in the shape of a one-seed table.

    Each `values` column becomes its mean over the group's runs (so a figure drawing ``test_acc``
    draws the mean), beside ``<value>_std`` (NaN for a single run) and ``seeds`` (runs per group).
    A value's bootstrap interval (``<value>_lo`` / ``<value>_hi``, when the runs have one) is kept
    for groups of a single run and NaN for the others, whose spread is the std over seeds.
    Columns constant within every group (layer, name, params, num_classes...) are kept; the
    others (seed, best_epoch, seconds...) are dropped. Groups keep their first appearance's order.

    Args:
        runs: Rows of :func:`probe_zoo` (or any table with the `by` and `values` columns).
        by: The columns of a group.
        values: The columns to average (``ece`` only where the runs have it).
    """
    by, values = list(by), [v for v in values if v != "ece" or v in runs.columns]
    missing = [c for c in [*by, *values] if c not in runs.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the runs (columns: {list(runs.columns)})")
    if len(runs) == 0:
        raise ValueError("there are no runs to summarise")
    grouped = runs.groupby(by, sort=False, dropna=False)
    out = grouped[values].mean()
    for v in values:
        out[f"{v}_std"] = grouped[v].std(ddof=1)
    out["seeds"] = grouped.size()
    bounds = [f"{v}{end}" for v in values if {f"{v}_lo", f"{v}_hi"} <= set(runs.columns) for end in ("_lo", "_hi")]
    for column in bounds:
        out[column] = grouped[column].first().where(out["seeds"] == 1)
    rest = [c for c in runs.columns if c not in by and c not in values and c not in bounds and c != "seed"]
    constant = [c for c in rest if (grouped[c].nunique(dropna=False) <= 1).all()]
    out = grouped[constant].first().join(out) if constant else out
    return out.reset_index()[[*by, *constant, *values, *[f"{v}_std" for v in values], *bounds, "seeds"]]
