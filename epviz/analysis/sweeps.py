"""Sweeps of probe trainings: over the blocks of one token cache, and over low-shot budgets.

Every run builds a fresh probe (seeded), trains it with :func:`epviz.fit` and reports its
validation top-1. Results are tidy: one row per probe x layer (or shots) x seed.

Low-shot sampling (ours): for k shots and a seed, k training images are drawn without
replacement from every class present in the training labels, with
``numpy.random.default_rng(seed)``; the same (k, seed) gives the same images to every probe.
Runs on whole token caches are stored in (and read back from) the probe cache
(:mod:`epviz.probe_cache`); low-shot subsets are always trained afresh.
The batch size of a low-shot run is ``min(batch_size, k * classes)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from epviz.analysis._common import context_columns
from epviz.probe_cache import fit_or_load
from epviz.probes.registry import build, probe_class
from epviz.tokenset import TokenSet

__all__ = ["layer_sweep", "low_shot", "sample_per_class", "aggregate_runs"]

def _probe_specs(probes: Sequence[str] | Mapping[str, Mapping]) -> list[tuple[str, str, dict]]:
    """(label, registry name, options) per probe.

    `probes` is a sequence of registry names, or a mapping label -> options, where the options
    may hold ``name`` (the registry name; default: the label).
    """
    if isinstance(probes, str):
        probes = [probes]
    if isinstance(probes, Mapping):
        specs = []
        for label, options in probes.items():
            options = dict(options or {})
            specs.append((str(label), str(options.pop("name", label)), options))
    else:
        specs = [(str(p), str(p), {}) for p in probes]
    if not specs:
        raise ValueError("no probes to train: pass e.g. probes=('cls', 'gap', 'ep')")
    for _, name, _ in specs:
        probe_class(name)  # unknown names fail here, before any training
    return specs


def _train_one(label: str, name: str, options: dict, train: TokenSet, val: TokenSet, seed: int,
               epochs: int, batch_size: int, device, fit_kwargs: dict) -> dict:
    options = dict(options)
    if "grid" not in options and "grid" in inspect.signature(probe_class(name).__init__).parameters:
        options["grid"] = train.grid
    num_classes = max(int(train.num_classes), int(val.num_classes))
    probe = build(name, train.dim, num_classes, seed=seed, **options)
    result = fit_or_load(probe, train, val, seed=seed, device=device, epochs=epochs, batch_size=batch_size, **fit_kwargs)
    return dict(
        best_acc=result.best_acc, final_acc=result.final_acc, best_epoch=result.best_epoch,
        epochs_run=int(result.history["epoch"].iloc[-1]),
        params=sum(p.numel() for p in result.probe.parameters() if p.requires_grad),
        n_train=len(train), seconds=result.seconds,
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
        context: Values of the context columns (``backbone`` defaults to the tokens' info).
        progress: Show a tqdm bar over runs.
        **fit_kwargs: Passed to :func:`epviz.fit` (optimizer, lr, weight_decay, warmup_epochs, ...).

    Returns:
        One row per probe x layer x seed: backbone, layer, probe, seed, best_acc, final_acc,
        best_epoch, epochs_run, params, n_train, seconds.
    """
    specs = _probe_specs(probes)
    available = _cache_layers(cache_train)
    layers = available if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ValueError(f"layers {missing} are not in the training cache (it holds {available})")
    missing_val = [layer for layer in layers if layer not in _cache_layers(cache_val)]
    if missing_val:
        raise ValueError(f"layers {missing_val} are not in the validation cache (it holds {_cache_layers(cache_val)})")
    seeds = [int(s) for s in seeds]
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
    shots = int(shots)
    if shots < 1:
        raise ValueError(f"shots must be a positive number of images per class, got {shots}")
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
    **fit_kwargs,
) -> pd.DataFrame:
    """Train every probe on k images per class, for every k and seed.

    Args:
        train_tokens: The full training tokens to sample from.
        val_tokens: Validation tokens (always the full set).
        shots: Images per class.
        seeds: One sample and one run per seed (sampling, initialisation and shuffling).
        probes: Registry names, or a mapping label -> build options (see :func:`layer_sweep`).
        epochs: Epochs per run.
        batch_size: Largest batch size; a run uses ``min(batch_size, its number of images)``.
        device: Where to train; None picks automatically.
        context: Values of the context columns (defaults from ``train_tokens.info``).
        progress: Show a tqdm bar over runs.
        **fit_kwargs: Passed to :func:`epviz.fit`.

    Returns:
        One row per probe x shots x seed: backbone, layer, probe, seed, shots, best_acc, final_acc,
        best_epoch, epochs_run, params, n_train, seconds. Aggregate with :func:`aggregate_runs`.
    """
    specs = _probe_specs(probes)
    shots, seeds = [int(k) for k in shots], [int(s) for s in seeds]
    if not shots or not seeds:
        raise ValueError("low_shot needs at least one value of shots and one seed")
    for k in shots:  # fail before any training
        sample_per_class(train_tokens.labels, k, 0)
    rows = []
    bar = tqdm(total=len(specs) * len(shots) * len(seeds), desc="low-shot", disable=not progress)
    for k in shots:
        for seed in seeds:
            subset = train_tokens.subset(sample_per_class(train_tokens.labels, k, seed))
            for label, name, options in specs:
                bar.set_postfix(shots=k, probe=label, seed=seed)
                ctx = context_columns(dict(context or {}, seed=seed), label, train_tokens)
                run = _train_one(label, name, options, subset, val_tokens, seed, epochs, min(batch_size, len(subset)), device, fit_kwargs)
                rows.append({**ctx, "shots": k, **run})
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
