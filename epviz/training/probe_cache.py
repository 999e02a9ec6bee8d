"""An on-disk cache of trained probes, keyed like the token cache.

Training is the slow part of every analysis, and the notebooks train the same probe on
the same tokens more than once (the efficiency zoo, the uniform ablation and the query
maps all need EP16 on the last block). A trained probe is stored under
``<token cache>/probes/<key>`` and found again when everything that changes its weights
is the same: the token caches of the training and validation sets (their keys name the
backbone, weights, dataset, transform and block), the probe's build options with their
defaults resolved (``probe.config``: ``d_out=1`` given or left out is the same probe), the
number of classes, the fit options and the seed.

Only tokens read whole from a token cache have such an identity (their ``info`` carries
the cache key); tokens built in memory or subsets are always trained afresh.

Each entry is ``<key>.safetensors`` (weights), ``<key>.json`` (options, fit summary; written last, it
marks the entry complete) and ``<key>.history.csv``, the run's training log: one row per epoch
(epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds). Every run trained or loaded here is
noted in :mod:`epviz.provenance`, so the figures and results made afterwards name their entries.

In a distributed run (``torchrun``) every rank reads the cache, and trains together with the
others unless every rank found the entry; only rank 0 writes it, and the others wait until it is
complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from epviz.atomic import atomic_write
from epviz.distributed import all_gather_object, barrier, is_main
from epviz.errors import ConfigError, DataError
from epviz.probes import Probe
from epviz.provenance import note_fit
from epviz.runtime import resolve_device, resolve_precision
from epviz.safe_load import read_json
from epviz.tokens import TokenSet, default_cache_dir
from epviz.training.checkpoints import load_probe
from epviz.training.fit import FitResult, fit
from epviz.training.tuning import tune

__all__ = [
    "PROBE_CACHE_FORMAT",
    "fit_or_load",
    "grid_points",
    "history_path",
    "load_cached_fit",
    "probe_cache_dir",
    "probe_key",
    "store_fit",
    "write_history",
]

PROBE_CACHE_FORMAT = 2  # 2: tuned runs (grid in the key), reference dolg initialisation


def probe_cache_dir() -> Path:
    """Folder of the cached probes: ``probes/`` inside the token cache folder."""
    return default_cache_dir() / "probes"


def _identity(tokens: TokenSet) -> dict | None:
    origin = tokens.origin
    if origin.cache is None or origin.subset is not None:
        return None
    return {"cache": origin.cache, "layer": origin.layer, "images": len(tokens)}


def probe_key(
    name: str,
    options: Mapping,
    num_classes: int,
    train: TokenSet,
    val: TokenSet,
    fit_options: Mapping,
    seed: int,
) -> str | None:
    """The cache key of a training run, or None when the tokens have no cache identity."""
    train_id, val_id = _identity(train), _identity(val)
    if train_id is None or val_id is None:
        return None
    doc = {
        "format": PROBE_CACHE_FORMAT,
        "probe": name,
        "options": dict(options),
        "num_classes": int(num_classes),
        "train": train_id,
        "val": val_id,
        "fit": dict(fit_options),
        "seed": int(seed),
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def load_cached_fit(key: str, cache_dir: str | Path | None = None) -> FitResult | None:
    """The stored fit of `key`, or None when there is none (or it cannot be read)."""
    base = Path(cache_dir or probe_cache_dir()) / key
    meta = base.with_name(base.name + ".json")
    if not meta.is_file() or not base.with_name(base.name + ".safetensors").is_file():
        return None
    nan = float("nan")
    try:
        doc = read_json(meta, what="a probe-cache entry", fix="It is trained again.")
        return FitResult(
            probe=load_probe(base, device=None),  # where fit would have trained it
            history=pd.DataFrame(doc.get("history", [])),
            best_epoch=int(doc.get("best_epoch") or 0),
            best_acc=nan if doc.get("best_acc") is None else float(doc["best_acc"]),
            final_acc=nan if doc.get("final_acc") is None else float(doc["final_acc"]),
            seconds=float(doc.get("seconds", nan)),
            config=dict(doc.get("fit", {}), cached=key),
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # unreadable, damaged or from another version: train again and overwrite


def grid_points(runs: pd.DataFrame, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Every grid point of the tuned runs in `runs`, read from their probe-cache entries.

    Args:
        runs: Rows naming their entry in a ``probe_cache`` column (:func:`epviz.results.results_rows`);
            their other columns (backbone, probe, seed, ...) are kept. Rows without an entry, or whose
            entry is a single fit, give no points.
        cache_dir: The probe cache (default :func:`probe_cache_dir`).

    Returns:
        One row per run x grid point: the run's columns, then ``lr``, ``weight_decay``, ``best_epoch``,
        ``best_val_acc``, ``chosen`` (the point selected on val), ``edge`` (its lr is the grid's
        smallest or largest: the grid may be too narrow for this probe) and ``selected_on``.
    """
    if "probe_cache" not in runs:
        raise ValueError("runs need a probe_cache column (epviz.results.results_rows gives one)")
    keep = [c for c in ("backbone", "layer", "probe", "seed") if c in runs]
    tables = []
    for _, run in runs.iterrows():
        key = run["probe_cache"]
        if not isinstance(key, str):
            continue
        meta = Path(cache_dir or probe_cache_dir()) / f"{key}.json"
        entry = read_json(meta, what="a probe-cache entry", fix="Delete it and train that run again.", error=DataError)
        grid = entry.get("fit", {}).get("grid") if isinstance(entry.get("fit"), dict) else None
        if not grid:
            continue
        points = pd.DataFrame(grid["points"])
        lrs = sorted(float(v) for v in grid["lrs"])
        chosen = grid["chosen"]["point"]
        points = points.assign(
            chosen=points["point"] == chosen,
            edge=points["lr"].isin([lrs[0], lrs[-1]]) if len(lrs) > 1 else False,
            selected_on=grid.get("selected_on"),
        )
        tables.append(points.assign(**{c: run[c] for c in keep})[keep + [c for c in points if c not in keep]])
    if not tables:
        return pd.DataFrame(columns=keep + ["lr", "weight_decay", "best_epoch", "best_val_acc", "chosen", "edge"])
    return pd.concat(tables, ignore_index=True)


def history_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Where the training log of entry `key` lies: ``<probe cache>/<key>.history.csv``."""
    return Path(cache_dir or probe_cache_dir()) / f"{key}.history.csv"


def write_history(key: str, history: pd.DataFrame, cache_dir: str | Path | None = None) -> Path:
    """Write a fit's history (one row per epoch) as ``<key>.history.csv`` beside its entry, atomically.

    In a distributed run only rank 0 writes; every rank gets the path.
    """
    path = history_path(key, cache_dir)
    if not is_main():
        return path
    return atomic_write(path, lambda tmp: history.to_csv(tmp, index=False))


def store_fit(key: str, result: FitResult, cache_dir: str | Path | None = None) -> Path:
    """Store a fit under `key`: its history CSV, the weights, then the JSON that marks the entry complete.

    In a distributed run only rank 0 writes (every rank holds the same result); every rank gets the
    entry's path. :func:`fit_or_load` then waits for rank 0 before any rank goes on.
    """
    base = Path(cache_dir or probe_cache_dir()) / key
    if not is_main():
        return base
    write_history(key, result.history, cache_dir)
    return result.save(base)


def fit_or_load(
    probe: Probe, train: TokenSet, val: TokenSet, *, seed: int = 0, cache: bool = True, device=None, **fit_options
) -> FitResult:
    """:func:`epviz.fit` `probe` (freshly built with `seed`), or load the stored result of the same run.

    With ``grid=...`` among the options the probe is tuned instead (:func:`epviz.training.tuning.tune`:
    one head per grid point, the point chosen on `val`), and the tuned run is what is stored.

    Args:
        probe: A freshly built probe; its ``config`` (every option, defaults resolved) is part of the key.
        train: Training tokens.
        val: Validation tokens (epoch selection).
        seed: Seed of the build and of the shuffling.
        cache: Read and write the cache (False: always train, store nothing).
        device: Where to train (not part of the key).
        **fit_options: :func:`epviz.fit` options, or a budget with ``grid`` (part of the key), and
            ``tensorboard`` (a folder for a single fit's TensorBoard log; not part of the key).

    Raises:
        ConfigError: ``tensorboard`` with a ``grid`` budget (a tuned run logs no TensorBoard curves).
    """
    fit_options = dict(fit_options)
    tensorboard = fit_options.pop("tensorboard", None)
    if "precision" in fit_options:  # "auto" is keyed as what it trains in on this device
        fit_options["precision"] = resolve_precision(resolve_device(device), fit_options["precision"])
    config = probe.config
    key = probe_key(config["name"], config, config["num_classes"], train, val, fit_options, seed) if cache else None
    stored = load_cached_fit(key) if key is not None else None
    if key is not None and all(all_gather_object(stored is not None)):  # every rank loads, or every rank trains
        assert stored is not None
        if not history_path(key).is_file():  # entries stored before the history CSV existed
            write_history(key, stored.history)
        note_fit(key, train, val, seed)
        stored.config["probe_cache"] = key
        return stored
    if fit_options.get("grid") is not None:
        if tensorboard is not None:
            raise ConfigError(
                "tensorboard= logs a single fit; a tuned run (grid=...) trains several heads at once: drop one of the two"
            )
        options = dict(fit_options)
        result = tune(probe, train, val, seed=seed, device=device, grid=options.pop("grid"), **options)
    else:
        options = {k: v for k, v in fit_options.items() if k != "grid"}
        result = fit(probe, train, val, seed=seed, device=device, progress=False, tensorboard=tensorboard, **options)
    if key is not None:
        store_fit(key, result)  # rank 0 writes
        barrier()  # the others go on once the entry is complete
    note_fit(key, train, val, seed)
    if key is not None:
        result.config["probe_cache"] = key  # the run's identity travels with its rows (probe_zoo, results_rows)
    return result
