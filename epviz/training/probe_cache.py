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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from epviz.probes import Probe
from epviz.tokens import TokenSet, default_cache_dir
from epviz.training.checkpoints import load_probe
from epviz.training.fit import FitResult, fit
from epviz.training.tuning import tune

__all__ = ["PROBE_CACHE_FORMAT", "probe_cache_dir", "probe_key", "load_cached_fit", "store_fit", "fit_or_load"]

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
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        probe = load_probe(base, device=None)  # where fit would have trained it
    except (OSError, ValueError, KeyError, RuntimeError):
        return None  # unreadable or from another version: train again and overwrite
    nan = float("nan")
    return FitResult(
        probe=probe,
        history=pd.DataFrame(doc.get("history", [])),
        best_epoch=int(doc.get("best_epoch") or 0),
        best_acc=nan if doc.get("best_acc") is None else float(doc["best_acc"]),
        final_acc=nan if doc.get("final_acc") is None else float(doc["final_acc"]),
        seconds=float(doc.get("seconds", nan)),
        config=dict(doc.get("fit", {}), cached=key),
    )


def store_fit(key: str, result: FitResult, cache_dir: str | Path | None = None) -> Path:
    """Store a fit under `key` (weights first, then the JSON that marks it complete)."""
    return result.save(Path(cache_dir or probe_cache_dir()) / key)


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
        **fit_options: :func:`epviz.fit` options, or a budget with ``grid`` (part of the key).
    """
    config = probe.config
    key = probe_key(config["name"], config, config["num_classes"], train, val, fit_options, seed) if cache else None
    if key is not None and (stored := load_cached_fit(key)) is not None:
        return stored
    if fit_options.get("grid") is not None:
        options = dict(fit_options)
        result = tune(probe, train, val, seed=seed, device=device, grid=options.pop("grid"), **options)
    else:
        result = fit(
            probe, train, val, seed=seed, device=device, progress=False, **{k: v for k, v in fit_options.items() if k != "grid"}
        )
    if key is not None:
        store_fit(key, result)
    return result
