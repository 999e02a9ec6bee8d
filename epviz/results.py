"""The results table: one row per (backbone, layer, probe, protocol, seed), every number traceable.

The columns follow the reference benchmark's leaderboard (``family``, ``method``, ``arch``,
``pretrain``, ``eval``, ``image_size``, ``lp``, ``ep``, ``ep_queries``, ``ep_variant``, ``log``) and
add what no probing benchmark reports: the mean over the probe's attention predictors of Δacc
(``mean_delta_acc``), MaxBoxAccV2, the in-box mass and the normalised entropy of its maps, each with
its interval (``<column>_lo``, ``<column>_hi``), and the provenance of the row (commit, setting,
notebook, token caches, probe-cache entry).

Definitions (ours):

* ``test_acc`` / ``val_acc``: the row's probe, top-1 as a fraction; ``test_acc_lo`` / ``test_acc_hi``: the
  95% bootstrap interval of ``test_acc`` over test images (NaN for runs that did not keep one); ``ece``
  (``_lo``, ``_hi``): the expected calibration error of the same predictions (15 equal-width confidence
  bins; :meth:`epviz.evaluate.Predictions.reliability` gives the diagram's table), with its interval.
  ``knn_cls`` / ``knn_gap``: test top-1 of cosine k-NN (k = 20) on the same backbone's [CLS] / mean patch
  token, a reader with nothing trained (:func:`epviz.evaluate.knn_predict`). ``lp``: the test top-1 of LP on
  [CLS] (``cls``) with the same backbone, layer, protocol and seed; ``ep``, ``ep_variant`` (its
  label) and ``ep_queries`` (its predictors): the row's own probe when it is EP, else the EP probe of
  the same group (``ep16``, else ``ep``, else the first EP label); NaN where the group has none.
* ``log``: the run's training history, ``probes/<key>.history.csv`` under the token cache folder
  (``$EPVIZ_CACHE``); ``probe_cache`` is its key, handed forward by the run itself
  (:func:`epviz.training.probe_zoo`'s ``probe_cache`` column); None when there is no entry (low-shot
  subsets, tokens built in memory).
* Map measures: means over the predictors of the predictor table (:func:`epviz.analysis.predictor_tables`)
  of the same backbone, layer, probe and seed. Their interval is the bootstrap interval of that mean
  over test images when the table's bootstrap records are given (``maps_interval`` = "bootstrap of
  the mean"), else the mean of the predictors' own bounds (a wider interval; "mean of the
  predictors' intervals"); NaN where the table has no interval.

:func:`append_results` keeps one CSV (``figures/results.csv`` in full mode, ``figures/fast/results.csv``
in fast mode) that notebooks 01 and 02 extend; :func:`write_readme` and :func:`check_readme` keep the
generated section of README.md (between :data:`START` and :data:`END`) equal to what the committed
``docs/results.csv`` gives (``epviz results --write`` / ``--check``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from epviz.atomic import atomic_write, atomic_write_text
from epviz.errors import DataError
from epviz.provenance import git_commit, git_dirty

__all__ = [
    "END",
    "NO_RUN",
    "RESULT_COLUMNS",
    "RESULT_KEY",
    "START",
    "append_results",
    "backbone_facts",
    "check_readme",
    "publish",
    "read_results",
    "readme_section",
    "render_section",
    "render_lift_section",
    "lift_section",
    "results_rows",
    "same_rows",
    "write_readme",
]

RESULT_KEY = ("backbone", "layer", "probe", "protocol", "seed")
MAP_MEASURES = ("mean_delta_acc", "maxboxacc_v2", "inbox_mass", "entropy_norm")
_MAP_SOURCE = {
    "mean_delta_acc": "delta_acc",
    "maxboxacc_v2": "maxboxacc_v2",
    "inbox_mass": "inbox_mass",
    "entropy_norm": "entropy_norm",
}
_FACT_COLUMNS = ("family", "method", "arch", "pretrain", "eval")  # what the rows say of the backbone and protocol, text
_RUN_COLUMNS = ("setting", "notebook", "test_tokens", "train_tokens", "probe_cache", "log", "commit")  # where a row came from
RESULT_COLUMNS = (
    *RESULT_KEY,
    *_FACT_COLUMNS,
    "image_size",
    "test_acc",
    "test_acc_lo",
    "test_acc_hi",
    "ece",
    "ece_lo",
    "ece_hi",
    "knn_cls",
    "knn_gap",
    "val_acc",
    "lp",
    "ep",
    "ep_queries",
    "ep_variant",
    "params",
    "predictors",
    "num_classes",
    "lr",
    "weight_decay",
    "tuned",
    *(f"{m}{s}" for m in MAP_MEASURES for s in ("", "_lo", "_hi")),
    "maps_interval",
    "level",
    *_RUN_COLUMNS,
    "dirty",
    "created",
)
START = "<!-- results:start -->"
END = "<!-- results:end -->"
NO_RUN = "No full run of this setting yet"
_EP_PREFERENCE = ("ep16", "ep", "ep_all16", "ep_all")
_TEXT_COLUMNS = ("backbone", "probe", "protocol", *_FACT_COLUMNS, "ep_variant", "maps_interval", *_RUN_COLUMNS, "created")

# --- backbones ------------------------------------------------------------------------------

_FAMILY = {"MAE": "MIM", "BEiTv2": "MIM", "EVA02": "MIM", "DINO": "JEA", "DINOv2": "Hybrid", "CLIP": "VLM", "SigLIP": "VLM"}
_PRETRAIN = {
    "mae": "IN-1K",
    "dino": "IN-1K",
    "lvd142m": "LVD-142M",
    "openai": "WIT-400M",
    "webli": "WebLI",
    "mim_in22k": "IN-22K",
}
_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "G"}
_ARCH = re.compile(r"^[a-z0-9]+_(tiny|small|base|large|huge|giant|gigantic)_patch(\d+)")


def _arch(timm_name: str) -> str:
    base = timm_name.split(".", 1)[0]
    match = _ARCH.match(base)
    return f"ViT-{_SIZES[match.group(1)]}/{match.group(2)}" if match else base


def backbone_facts(name: str, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The leaderboard's description of a backbone: family, method, arch, pretrain, image_size.

    Args:
        name: A zoo name, a preset ("mae-vit-b"), "<name>:random" or a timm name.
        meta: The ``backbone`` entry of its token cache's ``meta.json`` (its image size wins).

    Returns:
        ``family`` (MIM, JEA, Hybrid, VLM, SUP, control), ``method``, ``arch`` ("ViT-B/16"),
        ``pretrain`` (the pre-training data) and ``image_size`` (pixels); None where unknown.
    """
    from epviz.backbones import presets, zoo

    size = None
    if meta and meta.get("image_size"):
        size = int(list(meta["image_size"])[0])
    if name in zoo.ZOO:
        entry, a = zoo.ENTRIES[name], zoo.ARCHITECTURE
        return {
            "family": entry.family,
            "method": entry.method,
            "arch": f"ViT-tiny/{a['patch_size']} (D={a['embed_dim']}, {a['depth']} blocks)",
            "pretrain": "cluttered Fashion-MNIST" if entry.epochs else "none",
            "image_size": size or int(a["img_size"]),
        }
    base, random = presets.split_random(name)
    preset = presets.get_preset(base)
    timm_name = preset.timm_name if preset is not None else base
    tag = timm_name.split(".", 1)[1] if "." in timm_name else None
    method = re.split(r"[\s,:]", preset.objective, maxsplit=1)[0] if preset is not None else None
    facts = {
        "family": _FAMILY.get(method or "") if preset is not None else None,
        "method": method,
        "arch": _arch(timm_name),
        "pretrain": _PRETRAIN.get(tag or "", tag),
        "image_size": size,
    }
    if random:
        facts.update(family="control", method=f"{method or facts['arch']} architecture, random init", pretrain="none")
    return facts


def _cache_meta(name: str | None) -> dict[str, Any]:
    """The ``backbone`` entry of a token cache's meta.json, or {} when the cache is not on this machine."""
    if not name:
        return {}
    from epviz.tokens import default_cache_dir

    path = default_cache_dir() / name / "meta.json"
    try:
        backbone = json.loads(path.read_text()).get("backbone", {})
    except (OSError, ValueError):
        return {}
    return backbone if isinstance(backbone, dict) else {}


# --- rows -----------------------------------------------------------------------------------


def _is_ep(name: str) -> bool:
    from epviz.probes import probe_class

    try:
        return str(probe_class(str(name)).name) in ("ep", "ep_all")
    except (KeyError, ValueError):
        return bool(re.match(r"^ep(\d|_|$)", str(name).lower()))


def _missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _map_summary(tables: pd.DataFrame, records: Mapping[Any, Any] | None, level: float) -> pd.DataFrame:
    """Per (backbone, layer, probe, seed): the map measures' means over predictors and their intervals."""
    from epviz.analysis.intervals import percentile_interval

    keys = ["backbone", "layer", "probe", "seed"]
    missing = [c for c in [*keys, "delta_acc"] if c not in tables.columns]
    if missing:
        raise ValueError(f"the predictor table needs the columns {missing}; it has {list(tables.columns)}")
    seeds_per_probe = tables.groupby(["backbone", "probe"])["seed"].nunique()
    out = []
    for group, part in tables.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, group))
        boot = None
        if records is not None and seeds_per_probe.get((row["backbone"], row["probe"]), 0) == 1:
            boot = records.get((row["backbone"], row["probe"]))
        samples = boot.samples() if boot is not None else {}
        row["maps_interval"] = "bootstrap of the mean" if samples else "mean of the predictors' intervals"
        for measure, column in _MAP_SOURCE.items():
            values = part[column] if column in part else pd.Series(dtype=float)
            row[measure] = float(values.mean()) if values.notna().any() else math.nan
            if column in samples:
                lo, hi = percentile_interval(samples[column].to_numpy().mean(axis=1), level)
                row[f"{measure}_lo"], row[f"{measure}_hi"] = float(lo), float(hi)
            else:
                for side in ("lo", "hi"):
                    bound = part.get(f"{column}_{side}")
                    row[f"{measure}_{side}"] = float(bound.mean()) if bound is not None and bound.notna().any() else math.nan
        out.append(row)
    return pd.DataFrame(out)


def results_rows(
    runs: pd.DataFrame,
    tables: pd.DataFrame | None = None,
    *,
    records: Mapping[Any, Any] | None = None,
    tokens: Mapping[str, Mapping[str, Any]] | None = None,
    setting: Any = None,
    dataset: str | None = None,
    protocol: str = "cached",
    notebook: str | None = None,
    level: float = 0.95,
) -> pd.DataFrame:
    """The results table's rows of some runs, one per (backbone, layer, probe, protocol, seed).

    Args:
        runs: Rows of :func:`epviz.training.probe_zoo` (backbone, layer, probe, seed, test_acc; name,
            val_acc, params, predictors, num_classes, lr, weight_decay and tuned where present).
        tables: Predictor tables of some of the runs (:func:`epviz.analysis.predictor_tables`): their
            means over predictors fill the map columns.
        records: The tables' bootstrap records (the second value of :func:`epviz.analysis.predictor_tables`), for the intervals of the means.
        tokens: ``{backbone: {split: TokenSet}}`` (``study.tokens``): token caches and image sizes.
        setting: The :class:`epviz.Setting` (or its name) of the runs.
        dataset: The dataset spec the runs were evaluated on (the ``eval`` column).
        protocol: How the probes were trained: "cached" (on cached tokens) or "per-step".
        notebook: The notebook that made the runs.
        level: Level of the bootstrap intervals computed from `records`.

    Returns:
        A DataFrame with the columns :data:`RESULT_COLUMNS` (see the module docstring).

    Raises:
        ValueError: `runs` lacks a needed column or is empty, or `tables` lacks its context columns.
    """
    needed = ["backbone", "layer", "probe", "seed", "test_acc"]
    missing = [c for c in needed if c not in runs.columns]
    if missing:
        raise ValueError(f"results_rows needs runs with the columns {missing} (as probe_zoo returns); got {list(runs.columns)}")
    if len(runs) == 0:
        raise ValueError("results_rows got no runs: there is nothing to record")
    runs = runs.drop_duplicates(subset=["backbone", "layer", "probe", "seed"], keep="last").reset_index(drop=True)
    setting_name = getattr(setting, "name", setting)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit, dirty = git_commit(), git_dirty()
    rows = []
    for record in runs.to_dict("records"):
        split = (tokens or {}).get(record["backbone"], {})
        test_tokens = getattr(getattr(split.get("test"), "origin", None), "cache", None)
        train_tokens = getattr(getattr(split.get("train"), "origin", None), "cache", None)
        facts = backbone_facts(record["backbone"], _cache_meta(test_tokens or train_tokens))
        fingerprint = getattr(getattr(split.get("test"), "origin", None), "dataset", None)
        evaluated = dataset or (fingerprint.get("dataset") if isinstance(fingerprint, Mapping) else fingerprint)
        key = record.get("probe_cache")
        key = None if _missing(key) else str(key)
        rows.append(
            {
                "backbone": record["backbone"],
                "layer": int(record["layer"]),
                "probe": str(record["probe"]),
                "protocol": protocol,
                "seed": int(record["seed"]),
                **facts,
                "eval": evaluated,
                "test_acc": record["test_acc"],
                "test_acc_lo": record.get("test_acc_lo", math.nan),
                "test_acc_hi": record.get("test_acc_hi", math.nan),
                **{c: record.get(c, math.nan) for c in ("ece", "ece_lo", "ece_hi", "knn_cls", "knn_gap")},
                "val_acc": record.get("val_acc", math.nan),
                "params": record.get("params"),
                "predictors": record.get("predictors"),
                "num_classes": record.get("num_classes"),
                "lr": record.get("lr"),
                "weight_decay": record.get("weight_decay"),
                "tuned": record.get("tuned"),
                "level": level,
                "setting": setting_name,
                "notebook": notebook,
                "test_tokens": test_tokens,
                "train_tokens": record.get("train_tokens") or train_tokens,
                "probe_cache": key,
                "log": None if key is None else f"probes/{key}.history.csv",
                "commit": commit,
                "dirty": dirty,
                "created": created,
                "_ep": _is_ep(record.get("name", record["probe"])),
            }
        )
    table = _reference_columns(pd.DataFrame(rows))
    if tables is not None and len(tables):
        maps = _map_summary(tables, records, level)
        table = table.merge(maps, on=["backbone", "layer", "probe", "seed"], how="left", suffixes=("_run", ""))
    for column in RESULT_COLUMNS:
        if column not in table:
            table[column] = math.nan if column in _numeric_columns() else None
    return table[list(RESULT_COLUMNS)]


def _numeric_columns() -> set[str]:
    return {
        "level",
        "test_acc_lo",
        "test_acc_hi",
        "ece",
        "ece_lo",
        "ece_hi",
        *(f"{m}{s}" for m in MAP_MEASURES for s in ("", "_lo", "_hi")),
    }


def _reference_columns(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with ``lp``, ``ep``, ``ep_variant`` and ``ep_queries`` filled (see the module docstring)."""
    table["lp"], table["ep"], table["ep_variant"], table["ep_queries"] = math.nan, math.nan, None, math.nan
    for _, part in table.groupby(["backbone", "layer", "protocol", "seed"], sort=False):
        lp = part.loc[part["probe"] == "cls", "test_acc"]
        eps = part[part["_ep"]]
        reference = None
        if len(eps):
            labels = list(eps["probe"])
            label = next((p for p in _EP_PREFERENCE if p in labels), sorted(labels)[0])
            reference = eps[eps["probe"] == label].iloc[0]
        for index in part.index:
            table.at[index, "lp"] = float(lp.iloc[0]) if len(lp) else math.nan
            own = table.loc[index]
            chosen = own if own["_ep"] else reference
            if chosen is not None:
                table.at[index, "ep"] = chosen["test_acc"]
                table.at[index, "ep_variant"] = chosen["probe"]
                table.at[index, "ep_queries"] = math.nan if _missing(chosen["predictors"]) else chosen["predictors"]
    return table.drop(columns="_ep")


# --- the CSV --------------------------------------------------------------------------------


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The results table stored at `path` (an empty table with :data:`RESULT_COLUMNS` when there is none).

    Raises:
        DataError: The file is empty (not even a header line), is not a readable CSV table (binary, rows of
            another width), or lacks the columns of :data:`RESULT_KEY`; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    fix = "delete it (epviz results --write starts a new one), or point to the right file"
    try:
        header = pd.read_csv(path, nrows=0).columns
        table = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS if c in header})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty, not a results table (it has no header line): {fix}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a readable CSV table ({type(err).__name__}: {first}): {fix}") from None
    missing = [c for c in RESULT_KEY if c not in table.columns]
    if missing:
        raise DataError(f"{path} is not a results table (no {missing} columns): {fix}")
    return table


def _key_frame(table: pd.DataFrame) -> pd.Series:
    parts = [table[c].astype("string").fillna("") for c in RESULT_KEY]
    keys = parts[0]
    for part in parts[1:]:
        keys = keys + "\x1f" + part
    return keys


def _keep_known(rows: pd.DataFrame, keys: pd.Series, stored: pd.DataFrame) -> pd.DataFrame:
    """`rows` with the values they lack taken from stored rows of the same key and the same probe-cache entry."""
    if not len(stored) or "probe_cache" not in stored or "probe_cache" not in rows:
        return rows
    previous = stored.assign(_key=_key_frame(stored).to_numpy()).drop_duplicates("_key", keep="last").set_index("_key")
    rows = rows.astype(object)  # a stored value may not fit the dtype of a column the new rows leave empty
    for i, key in enumerate(keys):
        if key not in previous.index:
            continue
        old = previous.loc[key]
        entry = rows.at[i, "probe_cache"]
        if _missing(entry) or _missing(old["probe_cache"]) or str(entry) != str(old["probe_cache"]):
            continue
        for column in rows.columns:
            if column in old.index and _missing(rows.at[i, column]) and not _missing(old[column]):
                rows.at[i, column] = old[column]
    return rows.infer_objects()


def append_results(rows: pd.DataFrame, path: str | os.PathLike = "figures/results.csv") -> Path:
    """Add `rows` to the results table at `path`, replacing stored rows with the same key; atomic.

    When a stored row of the same key names the same probe-cache entry (the same trained probe), the
    values the new row lacks are kept from it: notebook 02 adds the map measures to the rows of
    notebook 01 without losing their ``lp``.

    Args:
        rows: From :func:`results_rows`.
        path: The table (created with its folder when missing).

    Returns:
        `path`.

    Raises:
        ValueError: `rows` lacks a key column, or holds a key twice.
    """
    missing = [c for c in RESULT_KEY if c not in rows.columns]
    if missing:
        raise ValueError(f"the rows lack the key columns {missing}: build them with results_rows")
    new_keys = _key_frame(rows)
    if new_keys.duplicated().any():
        twice = rows.loc[new_keys.duplicated(keep=False).to_numpy(), list(RESULT_KEY)].drop_duplicates()
        raise ValueError(f"the rows hold the same key more than once:\n{twice.to_string(index=False)}")
    stored = read_results(path)
    rows = _keep_known(rows.reset_index(drop=True), new_keys.reset_index(drop=True), stored)
    kept = stored[~_key_frame(stored).isin(set(new_keys)).to_numpy()] if len(stored) else stored
    parts = [p for p in (kept, rows) if len(p)]
    table = pd.concat(parts, ignore_index=True) if parts else rows.iloc[0:0]
    columns = [*RESULT_COLUMNS, *(c for c in table.columns if c not in RESULT_COLUMNS)]
    table = table.reindex(columns=columns)
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


# --- the README section ---------------------------------------------------------------------


def _pct(x: Any) -> str:
    return "–" if _missing_number(x) else f"{100 * float(x):.1f}"


def _num(x: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if _missing_number(x) else f"{scale * float(x):.{digits}f}"


def _missing_number(x: Any) -> bool:
    try:
        return x is None or not math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def _with_interval(part: pd.DataFrame, measure: str, scale: float, digits: int) -> str:
    have = part[part[measure].notna()] if measure in part else part.iloc[0:0]
    if not len(have):
        return "–"
    value = _num(have[measure].mean(), scale, digits)
    if len(have) > 1:
        return f"{value} (mean of {len(have)} seeds)"
    lo, hi = have[f"{measure}_lo"].iloc[0], have[f"{measure}_hi"].iloc[0]
    if _missing_number(lo) or _missing_number(hi):
        return value
    return f"{value} [{_num(lo, scale, digits)}, {_num(hi, scale, digits)}]"


def _layer_order(layer: Any) -> tuple[float, str]:
    return (math.inf, str(layer)) if _missing_number(layer) else (float(layer), "")


def _cell(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x).replace("|", "\\|")


def render_section(table: pd.DataFrame | None, source: str = "docs/results.csv") -> str:
    """The generated README section (markers included) of a results table.

    Args:
        table: The published results (None: the CSV does not exist).
        source: How the section names its CSV.
    """
    head = [
        START,
        f"<!-- generated by `epviz results --write` from {source}; `make test` checks it (`epviz results --check`): "
        "do not edit by hand -->",
        "",
    ]
    how = (
        f"`make figures` writes every run of notebooks 01 and 02 to `figures/results.csv`; `epviz results --write` "
        f"copies it to `{source}` and rebuilds this section."
    )
    if table is None:
        return "\n".join([*head, f"**{NO_RUN}**: `{source}` does not exist. {how}", END])
    if len(table) == 0:
        return "\n".join([*head, f"**{NO_RUN}**: `{source}` holds no rows. {how}", END])
    table = table.copy()
    for column in RESULT_COLUMNS:
        if column not in table:
            table[column] = None
    commits = sorted({str(c)[:10] for c in table["commit"].dropna()})
    settings = sorted({str(s) for s in table["setting"].dropna()})
    evals = sorted({str(s) for s in table["eval"].dropna()})
    dirty = bool(table["dirty"].astype("string").str.lower().eq("true").any())
    lines = [
        *head,
        f"{len(table)} runs from `{source}` (setting {', '.join(settings) or 'unknown'}; evaluated on "
        f"{', '.join(evals) or 'unknown'}; commit {', '.join(commits) or 'unknown'}"
        f"{', with uncommitted changes' if dirty else ''}). Top-1 on the test split in %, mean ± std over seeds; "
        "LP is LP on [CLS], EP the group's EP probe (variant, queries). The map columns are means over the "
        "probe's attention predictors with their 95% bootstrap interval over test images (Δacc in points). "
        f"Every row of `{source}` also names its token caches and its probe-cache entry, whose "
        "`<token cache>/probes/<key>.history.csv` is its training log.",
        "",
        "| Backbone | Family | Method | Arch. | Pre-training | Image size |",
        "|---|---|---|---|---|---:|",
    ]
    for backbone, part in table.groupby("backbone", sort=False):
        first = part.iloc[0]
        size = first["image_size"]
        lines.append(
            f"| {_cell(backbone)} | {_cell(first['family'])} | {_cell(first['method'])} | {_cell(first['arch'])} | "
            f"{_cell(first['pretrain'])} | {'–' if _missing_number(size) else int(float(size))} |"
        )
    lines += [
        "",
        "| Backbone | Layer | Probe | Protocol | Seeds | Top-1 | LP | EP | Δacc | MaxBoxAccV2 | In-box mass | Entropy |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = []
    for key, part in table.groupby(["backbone", "layer", "probe", "protocol"], sort=False, dropna=False):
        groups.append((key, part, float(part["test_acc"].mean())))
    order = {b: i for i, b in enumerate(dict.fromkeys(table["backbone"]))}
    groups.sort(key=lambda g: (order[g[0][0]], _layer_order(g[0][1]), -g[2] if math.isfinite(g[2]) else math.inf))
    for (backbone, layer, probe, protocol), part, mean in groups:
        n = len(part)
        top1 = f"{_pct(mean)} ± {_pct(part['test_acc'].std(ddof=1))}" if n > 1 else _with_interval(part, "test_acc", 100.0, 1)
        ep = "–"
        if part["ep"].notna().any():
            first = part[part["ep"].notna()].iloc[0]
            queries = "" if _missing_number(first["ep_queries"]) else f", {int(float(first['ep_queries']))}"
            ep = f"{_pct(part['ep'].mean())} ({_cell(first['ep_variant'])}{queries})"
        lines.append(
            f"| {_cell(backbone)} | {_cell(layer)} | {_cell(probe)} | {_cell(protocol)} | {n} | {top1} | "
            f"{_pct(part['lp'].mean())} | {ep} | {_with_interval(part, 'mean_delta_acc', 100.0, 1)} | "
            f"{_with_interval(part, 'maxboxacc_v2', 1.0, 2)} | {_with_interval(part, 'inbox_mass', 1.0, 2)} | "
            f"{_with_interval(part, 'entropy_norm', 1.0, 2)} |"
        )
    lines.append(END)
    return "\n".join(lines)


def readme_section(text: str, start: str = START, end: str = END) -> str | None:
    """A generated section of a README's text (markers included), or None when it has no markers.

    Raises:
        ValueError: The markers are there but out of order, or more than once.
    """
    if start not in text and end not in text:
        return None
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the README must hold {start} once, followed by {end} once; fix the markers by hand")
    return text[text.index(start) : text.index(end) + len(end)]


# --- the localization evidence (scripts/lift_check.py) ------------------------------------------

LIFT_START, LIFT_END = "<!-- lift:start -->", "<!-- lift:end -->"
_CONDITIONS = ("trained", "untrained", "untrained, matched entropy", "pixel salience")


def render_lift_section(
    table: pd.DataFrame, pairs: pd.DataFrame, source: str = "docs/lift.csv", control: str = "tiny-random"
) -> str:
    """The README's localization table (markers included) from ``scripts/lift_check.py``'s two CSVs."""
    probe = ", ".join(sorted({str(p) for p in table["probe"]}))
    lines = [
        LIFT_START,
        f"<!-- generated by `epviz results --write` from {source} and lift_pairs.csv; `make test` checks it: do not edit by hand -->",
        "",
        f"| Backbone | Top-1 | Lift: {probe} | untrained | untrained, sharpened | pixel salience | {probe} − salience | "
        f"− {control} | MaxBoxAccV2: trained − untrained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def stat(part: pd.DataFrame, column: str, scale: float = 1.0, digits: int = 3) -> str:
        values = part[column].astype(float) * scale
        return (
            f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else f"{values.mean():.{digits}f}"
        )

    def paired(a: str, b: str) -> str:
        try:
            return _a_minus_b(pairs, a, b, "mask_lift")
        except DataError:
            return "–"

    for backbone, part in table.groupby("backbone", sort=False):
        by = {c: part[part["condition"] == c].set_index("seed") for c in _CONDITIONS}
        gain = by["trained"]["maxboxacc_v2"] - by["untrained"]["maxboxacc_v2"]
        versus = "–" if backbone == control else paired(f"{backbone} trained", f"{control} trained")
        lines.append(
            f"| {backbone} | {stat(by['trained'], 'test_acc', 100.0, 1)} | {stat(by['trained'], 'mask_lift')} | "
            + " | ".join(f"{by[c]['mask_lift'].mean():.3f}" for c in _CONDITIONS[1:])
            + f" | {paired(f'{backbone} trained', f'{backbone} pixel salience')} | {versus} | "
            f"{gain.mean():+.2f} ± {gain.std(ddof=1):.2f} |"
        )
    seeds = table["seed"].nunique()
    lines += [
        "",
        f"{int(pairs['images'].max()):,} test canvases (`{source}`); mean ± std over {seeds} seeds, each with its own lr "
        "chosen on val. Lift: the map's "
        "mass on the item's mask above chance (0: uniform). *Sharpened*: the untrained maps at the trained head's entropy; "
        "*pixel salience*: patch brightness at that entropy. Differences are paired on test canvases, 95% intervals over "
        "seeds and canvases; n.r.: not resolved (the interval covers 0).",
    ]
    from epviz.backbones.zoo import mae_run

    run = {name: epoch for name, epoch in mae_run().items() if name in set(table["backbone"])}
    if len(run) > 2:
        first, last = min(run, key=run.__getitem__), max(run, key=run.__getitem__)
        trained = table[table["condition"] == "trained"].groupby("backbone")[["test_acc", "mask_lift"]].mean()
        epochs = " / ".join(str(e) for e in sorted(run.values()))
        along = {c: " / ".join(f"{scale * trained.loc[n, c]:.{d}f}" for n in sorted(run, key=run.__getitem__))
                 for c, scale, d in (("test_acc", 100, 1), ("mask_lift", 1, 3))}  # fmt: skip
        gain = {c: _a_minus_b(pairs, f"{last} trained", f"{first} trained", c, scale, d)
                for c, scale, d in (("test_acc", 100, 1), ("mask_lift", 1, 3))}  # fmt: skip
        lines += [
            "",
            f"Along one MAE run (`tiny-mae@epoch`, epoch 0 is {first}), epochs {epochs}: top-1 {along['test_acc']}, lift "
            f"{along['mask_lift']}; epoch {run[last]} − epoch 0: top-1 {gain['test_acc']} points, lift {gain['mask_lift']} "
            "(`docs/lift_pretraining.png`).",
        ]
    return "\n".join([*lines, LIFT_END])


def lift_section(docs: str | os.PathLike) -> str | None:
    """The localization section that `docs`/lift.csv and lift_pairs.csv give, or None when they are not there."""
    table, pairs = Path(docs) / "lift.csv", Path(docs) / "lift_pairs.csv"
    if not (table.is_file() and pairs.is_file()):
        return None
    return render_lift_section(pd.read_csv(table), pd.read_csv(pairs))


SALIENCE_START, SALIENCE_END = "<!-- salience:start -->", "<!-- salience:end -->"
QUERIES_START, QUERIES_END = "<!-- queries:start -->", "<!-- queries:end -->"


def _paired_text(pairs: pd.DataFrame, a: str, b: str, measure: str, scale: float = 1.0, digits: int = 3, **where) -> str:
    """One paired difference of ``scripts/lift_check.py``'s pairs CSV as ``+x [lo, hi]`` (`` n.r.`` when it covers 0)."""
    rows = pairs[(pairs["a"] == a) & (pairs["b"] == b) & (pairs["measure"] == measure)]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    if len(rows) != 1:
        raise DataError(f"the pairs CSV holds {len(rows)} rows of {a} - {b} ({measure}, {where}); expected one")
    r = rows.iloc[0]
    covers = "" if r["lo"] > 0 or r["hi"] < 0 else " n.r."
    lo, hi = sorted((scale * r["lo"], scale * r["hi"]))  # a negative scale swaps the bounds
    return f"{scale * r['estimate']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{covers}"


def _a_minus_b(pairs: pd.DataFrame, a: str, b: str, measure: str, scale: float = 1.0, digits: int = 3) -> str:
    """:func:`_paired_text` of a − b, whichever order the pairs CSV holds the two arms in."""
    try:
        return _paired_text(pairs, a, b, measure, scale, digits)
    except DataError:
        return _paired_text(pairs, b, a, measure, -scale, digits)


def render_salience_section(
    table: pd.DataFrame, pairs: pd.DataFrame, first: str = "tiny-mae", second: str = "tiny-random"
) -> str:
    """The README's salience finding (markers included), every number from ``lift_check.py --salience``'s CSVs."""
    levels = sorted(int(v) for v in table["salience"].unique() if v)
    trained = table[table["condition"] == "trained"].groupby(["salience", "backbone"])[["test_acc", "mask_lift"]].mean()

    def fall(name: str, measure: str, scale: float, digits: int) -> str:
        return " / ".join(
            _paired_text(pairs, f"{name} fall 0->{lv}", "no fall", measure, scale, digits, salience=lv) for lv in levels
        )

    def gap(measure: str, scale: float, digits: int) -> str:
        return " / ".join(
            _paired_text(pairs, f"{first} fall 0->{lv}", f"{second} fall 0->{lv}", measure, scale, digits, salience=lv)
            for lv in levels
        )

    top, worst = levels[-1], trained.loc[levels[-1]]
    seeds, images = table["seed"].nunique(), int(pairs["images"].max())
    last = pairs[(pairs["a"] == f"{first} fall 0->{top}") & (pairs["b"] == f"{second} fall 0->{top}")]
    lift_gap = last[last["measure"] == "mask_lift"].iloc[0]
    reading = (
        f"{second} loses more of its mass on the item than {first}: the first localization measure here that "
        "separates pre-training from the random backbone"
        if lift_gap["hi"] < 0
        else f"{first} loses more of its mass on the item than {second}"
        if lift_gap["lo"] > 0
        else "the two lose their mass on the item alike (not resolved)"
    )
    text = (
        f"*Salience (`scripts/lift_check.py --salience`, `docs/salience.csv`; EP16, {seeds} seeds, {images:,} test "
        f"canvases per level).* As brightness says less about where the item is (levels {' / '.join(map(str, levels))}), "
        f"top-1 falls by {fall(first, 'test_acc', 100, 1)} points on {first} and by {fall(second, 'test_acc', 100, 1)} "
        f"on {second} (difference of the falls {gap('test_acc', 100, 1)}); lift falls by {fall(first, 'mask_lift', 1, 3)} "
        f"and {fall(second, 'mask_lift', 1, 3)} (difference {gap('mask_lift', 1, 3)}). At level {top} {reading} "
        f"(top-1 {100 * worst.loc[first, 'test_acc']:.1f} against {100 * worst.loc[second, 'test_acc']:.1f}, lift "
        f"{worst.loc[first, 'mask_lift']:.3f} against {worst.loc[second, 'mask_lift']:.3f}; {first} − {second}: "
        f"{_paired_text(pairs, f'{first} trained', f'{second} trained', 'mask_lift', salience=top)})."
    )
    return "\n".join([SALIENCE_START, _bullet(text), SALIENCE_END])


def _bullet(text: str, width: int = 116) -> str:
    """`text` as one README list item, wrapped at `width`."""
    return textwrap.fill(text, width, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)


def render_queries_section(table: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """The README's number-of-queries finding (markers included), every number from ``lift_check.py --queries``'s CSVs."""
    trained = table[table["condition"] == "trained"]
    backbone, probe = str(trained["backbone"].iloc[0]), str(trained["probe"].iloc[0])
    means = trained.groupby("queries")[["test_acc", "mask_lift"]].mean()
    ms = [int(m) for m in means.index]
    reference = 16 if 16 in ms else max(ms)
    by_m = ", ".join(f"{m}: {100 * means.loc[m, 'test_acc']:.1f} / {means.loc[m, 'mask_lift']:.3f}" for m in ms)
    versus = "; ".join(
        f"M = {m}: {_paired_text(pairs, f'{backbone} M={m}', f'{backbone} M={reference}', 'test_acc', 100, 1)}"
        for m in ms
        if m != reference
    )
    seeds = trained["seed"].nunique()
    resolved = {m: not _paired_text(pairs, f"{backbone} M={m}", f"{backbone} M={reference}", "test_acc").endswith("n.r.")
                for m in ms if m != reference}  # fmt: skip
    plateau = min((m for m in ms if not any(resolved.get(n, False) for n in ms if n >= m)), default=reference)
    lift = means["mask_lift"]
    text = (
        f"*Number of queries M (`lift_check.py --queries`, `docs/queries.csv`; {probe} on {backbone}, {seeds} seeds).* "
        f"Top-1 / lift by M: {by_m}. Top-1 against M = {reference} (points): {versus}; top-1 is M = {reference}'s "
        f"from M = {plateau} on (no larger M resolved against it), while lift falls from {lift.max():.3f} (M = "
        f"{int(lift.idxmax())}) to {lift[max(ms)]:.3f} (M = {max(ms)}): more queries, each less on the item."
    )
    return "\n".join([QUERIES_START, _bullet(text), QUERIES_END])


def _generated_sections(docs: Path) -> list[tuple[str, str, str, str, str]]:
    """The README sections the CSVs under `docs` give: (name, start marker, end marker, text, sources)."""
    out = []
    lift = lift_section(docs)
    if lift is not None:
        out.append(("localization", LIFT_START, LIFT_END, lift, "lift.csv and lift_pairs.csv beside it"))
    for name, start, end, render in (
        ("salience", SALIENCE_START, SALIENCE_END, render_salience_section),
        ("queries", QUERIES_START, QUERIES_END, render_queries_section),
    ):
        table, pairs = docs / f"{name}.csv", docs / f"{name}_pairs.csv"
        if table.is_file() and pairs.is_file():
            out.append((name, start, end, render(pd.read_csv(table), pd.read_csv(pairs)), f"{name}.csv and {name}_pairs.csv"))
    return out


def _published(csv: Path) -> pd.DataFrame | None:
    return read_results(csv) if csv.is_file() else None


def publish(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a full run's results table to the published CSV, atomically.

    Raises:
        FileNotFoundError: `source` does not exist.
        ValueError: It holds fast-mode rows (they check the pipeline, they are not results).
    """
    source, target = Path(source), Path(target)
    table = read_results(source) if source.is_file() else None
    if table is None:
        raise FileNotFoundError(f"no results table at {source}: run `make figures` (full mode) first")
    if "setting" in table and table["setting"].astype("string").eq("fast").any():
        raise ValueError(
            f"{source} holds fast-mode rows (setting 'fast'): their numbers check the pipeline and are not results; "
            "publish the table of a full run (figures/results.csv)"
        )
    return atomic_write(target, lambda tmp: table.to_csv(tmp, index=False))


def write_readme(readme: str | os.PathLike, csv: str | os.PathLike, source_name: str = "docs/results.csv") -> Path:
    """Rebuild the README's generated section from `csv` (an empty table is created when `csv` is missing).

    The section goes between the markers; a README without them gets a "Results" section at the end.
    """
    readme, csv = Path(readme), Path(csv)
    if not csv.is_file():
        atomic_write_text(csv, ",".join(RESULT_COLUMNS) + "\n")
    section = render_section(_published(csv), source_name)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    current = readme_section(text)
    if current is None:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{section}\n"
    else:
        text = text.replace(current, section)
    for _, start, end, generated, _ in _generated_sections(csv.parent):
        current = readme_section(text, start, end)
        if current is not None:
            text = text.replace(current, generated)
    return atomic_write_text(readme, text)


def check_readme(readme: str | os.PathLike, csv: str | os.PathLike, source_name: str = "docs/results.csv") -> str | None:
    """None when the README's generated sections are what `csv` (and the lift CSVs beside it) give, else a
    message with the difference and the fix."""
    readme, csv = Path(readme), Path(csv)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    fix = f"run `epviz results --write` (it rebuilds the sections from {source_name} and the CSVs beside it) and commit"
    sections = [("results", START, END, render_section(_published(csv), source_name), source_name)]
    sections += _generated_sections(csv.parent)
    for name, start, end, expected, source in sections:
        found = readme_section(text, start, end)
        if found is None:
            return f"{readme} has no {name} section ({start} ... {end}): {fix}"
        if found != expected:
            diff = "\n".join(
                list(difflib.unified_diff(found.splitlines(), expected.splitlines(), "README.md", "expected", lineterm=""))[:40]
            )
            return f"the {name} section of {readme} is not what {source} gives:\n{diff}\n{fix}"
    return None


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two results tables hold the same rows (order and float formatting aside)."""
    if len(a) != len(b) or set(a.columns) != set(b.columns):
        return False
    columns = sorted(a.columns)
    left = a[columns].astype("string").sort_values(columns).reset_index(drop=True)
    right = b[columns].astype("string").sort_values(columns).reset_index(drop=True)
    return bool(np.all(left.fillna("").to_numpy() == right.fillna("").to_numpy()))
