"""Provenance: which code, packages, data, caches and images every figure and result comes from.

* :func:`git_commit` and :func:`package_versions`: the code and the packages that made a file.
* :func:`note` and :func:`recorded`: what this process has used so far (datasets, token caches,
  probe-cache entries, seeds). The probe cache notes every run it trains or loads
  (:func:`note_fit`); notebooks note their study's tokens. A figure saved later names them.
* :func:`sidecar` and :func:`write_sidecar`: the ``<name>.json`` that :func:`epviz.viz.save_figure`
  writes beside every figure.

A sidecar holds ``commit`` (``git rev-parse HEAD`` of the checkout holding epviz, ``$EPVIZ_COMMIT``
when set, else "unknown") and ``dirty`` (uncommitted changes to tracked files, None when unknown),
``versions`` (epviz, torch, timm, numpy, pandas), ``seeds``, ``dataset``, ``token_caches``,
``probe_caches``, ``images`` (the exact images shown, for figures that show images), the names and
sha256 of the files it describes, and ``sources``: where each of the five came from, ``"given"``
(the caller's ``provenance=``), ``"data"`` (the figure's table, e.g. its ``seed`` column) or
``"session"`` (everything this process noted before the figure was saved: a superset of what the
figure shows when the process made several figures).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from epviz.atomic import atomic_write_text

__all__ = [
    "PACKAGES",
    "SIDECAR_FIELDS",
    "compute",
    "git_commit",
    "git_dirty",
    "jsonable",
    "note",
    "note_fit",
    "package_versions",
    "read_sidecar",
    "recorded",
    "reset",
    "sidecar",
    "token_cache_names",
    "write_sidecar",
]

PACKAGES = ("epviz", "torch", "timm", "numpy", "pandas")
SIDECAR_FIELDS = ("seeds", "dataset", "token_caches", "probe_caches", "images")


def _checkout() -> Path:
    """The folder holding the epviz package (the git checkout when installed editable)."""
    return Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=8)
def _commit(root: Path) -> str:
    return _git(root, "rev-parse", "HEAD") or "unknown"


@functools.lru_cache(maxsize=8)
def _dirty(root: Path) -> bool | None:
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def git_commit(root: str | os.PathLike | None = None) -> str:
    """The commit of the code: ``$EPVIZ_COMMIT``, else ``git rev-parse HEAD`` of `root`, else "unknown".

    Args:
        root: A git checkout; default the one holding the epviz package (read once per process).
    """
    if os.environ.get("EPVIZ_COMMIT"):
        return os.environ["EPVIZ_COMMIT"]
    return _commit(Path(root).resolve() if root is not None else _checkout())


def git_dirty(root: str | os.PathLike | None = None) -> bool | None:
    """Whether tracked files of `root` differ from its commit; None when unknown (no git, no checkout)."""
    if os.environ.get("EPVIZ_COMMIT"):
        return None
    return _dirty(Path(root).resolve() if root is not None else _checkout())


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for name in PACKAGES:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


def compute() -> dict[str, Any]:
    """Where this process computes: the torch device it would pick, torch's CPU threads and the CPU count.

    On CPU the order of floating-point sums follows the thread count, so a rerun with another count can
    move a probe's accuracy by about the validation noise (README, "Checking the grid's choice").
    """
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def package_versions() -> dict[str, str | None]:
    """Installed versions of epviz, torch, timm, numpy and pandas (None for one not installed)."""
    return dict(_versions())


# --- what this process used ---------------------------------------------------------------

_SESSION: dict[str, Any] = {}


def reset() -> None:
    """Forget everything noted so far (a new session starts)."""
    _SESSION.clear()
    _SESSION.update(datasets={}, token_caches={}, probe_caches={}, seeds={})


reset()


def token_cache_names(tokens: Any) -> list[str]:
    """Names of the token caches behind `tokens`, in order, without repeats.

    Args:
        tokens: A TokenSet (its ``origin.cache``), a TokenCache (its folder name), a cache name, or a
            mapping / sequence of these, nested as deep as needed (``study.tokens``, ``study.caches``).
    """
    found: dict[str, None] = {}

    def walk(obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, str):
            found[obj] = None
        elif getattr(obj, "origin", None) is not None:
            if getattr(obj.origin, "cache", None):
                found[str(obj.origin.cache)] = None
        elif getattr(obj, "path", None) is not None and getattr(obj, "meta", None) is not None:
            found[Path(obj.path).name] = None
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, Iterable):
            for value in obj:
                walk(value)

    walk(tokens)
    return list(found)


def note(
    *,
    dataset: Any = None,
    tokens: Any = None,
    token_caches: Iterable[str] = (),
    probe_caches: Iterable[str] = (),
    seeds: Iterable[int] = (),
) -> None:
    """Note what this process used, for the sidecars of the figures saved afterwards.

    Args:
        dataset: A dataset spec ("cluttered-fashion-mnist") or fingerprint.
        tokens: TokenSets, TokenCaches or mappings of them (see :func:`token_cache_names`).
        token_caches: Token cache names.
        probe_caches: Probe-cache keys.
        seeds: Seeds of runs or samples.
    """
    if dataset is not None:
        _SESSION["datasets"][json.dumps(jsonable(dataset), sort_keys=True)] = jsonable(dataset)
    for name in [*token_cache_names(tokens), *token_caches]:
        _SESSION["token_caches"][str(name)] = None
    for key in probe_caches:
        _SESSION["probe_caches"][str(key)] = None
    for seed in seeds:
        _SESSION["seeds"][int(seed)] = None


def note_fit(key: str | None, train: Any, val: Any, seed: int) -> None:
    """Note one training run's data, tokens, probe-cache key and seed (the probe cache calls it for every run).

    The run's identity itself travels with its result (``FitResult.config["probe_cache"]``) and rows.
    """
    origin = getattr(train, "origin", None)
    dataset = getattr(origin, "dataset", None)
    note(
        dataset=dataset.get("dataset") if isinstance(dataset, Mapping) else dataset,
        tokens=[train, val],
        probe_caches=[key] if key else [],
        seeds=[seed],
    )


def recorded() -> dict[str, Any]:
    """Everything noted so far: ``datasets``, ``token_caches``, ``probe_caches``, ``seeds`` (lists)."""
    return {
        "datasets": list(_SESSION["datasets"].values()),
        "token_caches": list(_SESSION["token_caches"]),
        "probe_caches": list(_SESSION["probe_caches"]),
        "seeds": sorted(_SESSION["seeds"]),
    }


# --- sidecars ----------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON: numpy scalars and arrays as numbers and lists, NaN/inf as None, paths and
    other objects as strings."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # torch tensors, numpy scalars
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, range)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_data(data: Any) -> dict[str, Any]:
    """Seeds and dataset read off a figure's table (its ``seed`` and ``dataset`` columns)."""
    out: dict[str, Any] = {}
    columns = getattr(data, "columns", ())
    if "seed" in columns:
        seeds = sorted({int(s) for s in data["seed"].dropna().unique()})
        if seeds:
            out["seeds"] = seeds
    if "dataset" in columns:
        datasets = list(data["dataset"].dropna().unique())
        if len(datasets) == 1:
            out["dataset"] = datasets[0]
        elif datasets:
            out["dataset"] = sorted(str(d) for d in datasets)
    return out


def _from_session() -> dict[str, Any]:
    record = recorded()
    out: dict[str, Any] = {}
    if record["seeds"]:
        out["seeds"] = record["seeds"]
    if len(record["datasets"]) == 1:
        out["dataset"] = record["datasets"][0]
    elif record["datasets"]:
        out["dataset"] = record["datasets"]
    if record["token_caches"]:
        out["token_caches"] = record["token_caches"]
    if record["probe_caches"]:
        out["probe_caches"] = record["probe_caches"]
    return out


def sidecar(
    name: str,
    files: Mapping[str, str | os.PathLike] | None = None,
    data: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance document of one saved figure (or any file).

    Args:
        name: The figure's name.
        files: The files it describes, by kind (``{"png": path, "csv": path}``): their names and sha256.
        data: The table behind the figure; its ``seed`` and ``dataset`` columns fill what the caller left out.
        provenance: What the caller knows (``seeds``, ``dataset``, ``token_caches``, ``probe_caches``,
            ``images``, any other JSON-able entry); it takes precedence.

    Returns:
        figure, created (UTC), commit, dirty, versions, compute (see :func:`compute`), files, the five :data:`SIDECAR_FIELDS` (None where
        nothing is known), sources (where each of them came from) and the caller's other entries.
    """
    given = dict(provenance or {})
    found = {"data": _from_data(data), "session": _from_session()}
    doc: dict[str, Any] = {
        "figure": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "versions": package_versions(),
        "compute": compute(),
        "files": {kind: {"name": Path(p).name, "sha256": _sha256(Path(p))} for kind, p in (files or {}).items()},
    }
    sources: dict[str, str | None] = {}
    for field in SIDECAR_FIELDS:
        if given.get(field) is not None:
            doc[field], sources[field] = given.pop(field), "given"
            continue
        given.pop(field, None)
        for source in ("data", "session"):
            if field in found[source]:
                doc[field], sources[field] = found[source][field], source
                break
        else:
            doc[field], sources[field] = None, None
    doc["sources"] = sources
    for key, value in given.items():
        doc.setdefault(str(key), value)
    return jsonable(doc)


def write_sidecar(path: str | os.PathLike, doc: Mapping[str, Any]) -> Path:
    """Write `doc` as indented JSON to `path`, atomically."""
    return atomic_write_text(path, json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a figure: `path` is the figure's PNG or CSV (its ``.json`` is read) or the JSON itself.

    Raises:
        FileNotFoundError: No sidecar beside the figure (saved before sidecars existed: save it again).
    """
    target = Path(path).with_suffix(".json")
    if not target.is_file():
        raise FileNotFoundError(f"no provenance sidecar {target}: the figure was saved without one; save it again")
    return json.loads(target.read_text(encoding="utf-8"))
