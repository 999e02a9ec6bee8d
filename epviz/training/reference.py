"""Heads of the reference implementation (github.com/billpsomas/efficient-probing) as epviz probes, and back.

The reference trains every probe as ``nn.Sequential(pooling, BatchNorm1d(width, affine=False, eps=1e-6),
Linear)`` on top of a frozen encoder, and its files hold that Sequential's state dict:

* EP and ep_all: ``0.cls_token`` (1, M, D), the M queries; ``0.v.weight`` (D / d_out, D), the value
  projection (no bias); ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``; ``2.weight``
  (C, D / d_out) and ``2.bias`` (C).
* Linear probing (``cls``, and GAP, which the reference calls ``pos``): ``0.running_*``, ``1.weight``
  (C, D), ``1.bias``.

Two files carry them:

* training checkpoints (``checkpoint-best.pth``, ``checkpoint.pth``): a dict with the state dict under
  ``model``, ``epoch``, ``test_stats`` (``test_acc1`` in percent), the optimizer and grad-scaler states
  (ignored here) and ``args``, the run's ``argparse.Namespace`` (``cls_features``, ``ep_queries``,
  ``d_out``, ``nb_classes``, ``model``, ...);
* released heads: ``ep_head.pth`` holding ``{"state_dict": ..., "meta": ...}`` beside a ``config.json``
  with the same meta (``method`` and ``arch`` of the encoder, ``cls_features``, ``ep_queries``,
  ``head_epoch``, ``val_acc1_at_head_epoch``, ``table_best_acc1``, ...).

The reference's EP is epviz's ``ep``: scores ``U X^T / sqrt(D)`` softmaxed over the tokens, and output
columns ``[j c, (j + 1) c)`` (c = D / (d_out M)) pooled by query j from ``X W_V^T``; so the queries are
``cls_token[0]`` and ``value.weight`` is ``v.weight``, unchanged. Its ``_all`` variant appends one [CLS]
key: the class token (its DINOv2, DINOv3, Franca and MAE-style wrappers), or the mean of the prefix
tokens (its timm wrapper, as for its LP on [CLS]); loaded heads get ``prefix="first"``, or ``"mean"``
when the run used the timm loader.

Files are read with ``torch.load(weights_only=True)``; besides tensors and plain containers only
``argparse.Namespace`` and the ``pathlib`` path classes (which ``args`` holds) may be unpickled, and a file
needing anything else is refused with a :class:`~epviz.errors.WeightsError` naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from epviz._version import __version__
from epviz.atomic import atomic_write
from epviz.backbones.loader import check_weights_fit
from epviz.errors import ConfigError, WeightsError
from epviz.probes import Probe, build
from epviz.provenance import jsonable
from epviz.runtime import resolve_device
from epviz.safe_load import (
    MAX_PARAMETERS,
    MAX_SIZE,
    check_archive,
    check_nesting,
    check_weights,
    config_int,
    config_number,
    is_torch_checkpoint,
    read_json,
    torch_errors,
    unsafe_globals,
)

__all__ = ["REFERENCE", "RELEASE_CONFIG", "RELEASE_FILE", "load_reference_head", "save_reference_head"]

REFERENCE = "billpsomas/efficient-probing"
"""The reference implementation's repository."""

RELEASE_FILE = "ep_head.pth"
RELEASE_CONFIG = "config.json"
_CHECKPOINTS = ("checkpoint-best.pth", "checkpoint.pth")

# The reference's --cls_features values epviz reads -> epviz probe name.
_METHODS = {"ep": "ep", "ep_all": "ep_all", "cls": "cls", "pos": "gap", "gap": "gap"}
_EP_KEYS = frozenset({"0.cls_token", "0.v.weight", "1.running_mean", "1.running_var", "2.weight", "2.bias"})
_LP_KEYS = frozenset({"0.running_mean", "0.running_var", "1.weight", "1.bias"})

# The run arguments worth keeping in the probe's record (never the paths: data, output, weights).
_ARGS_KEPT = (
    "model",
    "cls_features",
    "ep_queries",
    "d_out",
    "nb_classes",
    "dataset_name",
    "input_size",
    "epochs",
    "batch_size",
    "accum_iter",
    "optimizer",
    "blr",
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "seed",
    "amp",
    "timm",
    "openclip",
    "openclip_pretrain",
    "simmim",
    "radio",
    "no_cls_token",
    "return_block",
)

# Plain metadata classes a reference checkpoint pickles: the args Namespace and its Path values. Paths are
# read as pure paths under every name Python has pickled them by (pathlib.PosixPath, pathlib._local.PosixPath).
_PATHS = [
    (cls, f"{module}.{flavour}{kind}Path")
    for module in ("pathlib", "pathlib._local")
    for kind, cls in (("Posix", pathlib.PurePosixPath), ("Windows", pathlib.PureWindowsPath))
    for flavour in ("", "Pure")
]
_SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_PATHS]
_SAFE_NAMES = frozenset({"argparse.Namespace", *(name for _, name in _PATHS)})


def load_reference_head(
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
) -> Probe:
    """Read an EP, ep_all or linear-probing head of the reference implementation as an epviz probe, in eval mode.

    D, M, d_out and C come from the tensor shapes; the method from ``cls_features`` (in `config`, the
    release's meta or ``config.json``, or the checkpoint's ``args``, in that order), else ``ep`` for an EP
    state dict and ``cls`` for a linear one. ``probe.config["source"]`` records the file, its layout, the
    reference's method, the epoch and validation top-1 (percent) where known, the release meta and the
    run arguments (without paths); :func:`~epviz.training.save_probe` keeps it.

    Args:
        path: A training checkpoint (``checkpoint-best.pth``), a released ``ep_head.pth``, a bare
            state dict, or a folder holding one of them (``ep_head.pth``, else ``checkpoint-best.pth``,
            else ``checkpoint.pth``). A ``config.json`` beside the file is read.
        config: The head's metadata, or the path of a JSON file holding it, over what the files say:
            ``cls_features`` (``"ep"``, ``"ep_all"``, ``"cls"``, ``"pos"``/``"gap"``), ``loader``
            (``"timm"`` reads [CLS] as the mean of the prefix tokens), and epviz's ``prefix`` and
            ``grid`` build options; other entries are recorded in the source meta.
        device: Where to place the probe.

    What the files declare is checked before anything is built (see :mod:`epviz.safe_load`): the
    checkpoint's zip records, then the head's tensors (dense as stored, at most
    :data:`~epviz.safe_load.MAX_PARAMETERS` values, finite, BatchNorm running variances not negative),
    then the numbers of the metadata (JSON integers, in range, equal to what the tensors say).

    Raises:
        FileNotFoundError: No such file, or a folder without a head file.
        WeightsError: The file cannot be read, needs pickled objects other than the run arguments (the
            message names them), holds a head of another pooling, its tensors are expanded views, hold NaN,
            inf or a negative running variance, its shapes or run arguments do not make an EP or linear
            head, or torch fails (out of memory) building the probe.
        ConfigError: ``config.json`` or `config` is not a readable JSON object (at most 10 MiB, 64 deep), states
            a number as a string, a boolean or out of range, contradicts the tensors (``ep_queries``, ``d_out``,
            ``num_classes``/``nb_classes``, ``dim``), or ``config.json`` and the checkpoint's meta give one number
            two values. The message names the file, the field, both values and the fix.
    """
    file = _head_file(Path(path))
    loaded = _read(file)
    state, info = _unpack(loaded, file)
    docs: list[tuple[str, Mapping[str, Any], bool]] = [(f"{file} (its meta)", info.pop("meta"), True)]
    beside = file.with_name(RELEASE_CONFIG)
    if beside.is_file() and beside != file:
        docs.append((str(beside), _read_json(beside), True))
    if isinstance(config, (str, os.PathLike)):
        docs.append((str(config), _read_json(Path(config)), False))
    elif config is not None:
        docs.append(("the config= argument", dict(config), False))
    args = info.get("args") or {}
    state = _head_state(state, info.pop("saved_module", None), file)
    check_weights(state, file, max_parameters=MAX_PARAMETERS)  # dense, bounded, finite: before any value is read
    kind, shapes = _recognise(state, file)
    _check_args(args, shapes, file)
    meta, said_by = _check_meta(docs, shapes, file)
    method = meta.get("cls_features", args.get("cls_features"))
    name = _probe_name(method, kind, file, said_by.get("cls_features", f"{file}: its args"))
    options: dict[str, Any] = {}
    if kind == "ep":
        options.update(num_queries=shapes["queries"], d_out=shapes["d_out"])
    if name in ("ep_all", "cls"):
        timm = meta.get("loader") == "timm" or bool(args.get("timm"))
        options["prefix"] = meta.get("prefix") or ("mean" if timm else "first")
    if meta.get("grid") is not None:
        options["grid"] = meta["grid"]
    described = f"an epviz '{name}' probe with D={shapes['dim']}, C={shapes['classes']}"
    try:
        with torch_errors(file, f"building {described}"):
            probe = build(name, shapes["dim"], shapes["classes"], **options)
    except (TypeError, ValueError) as err:
        given = sorted({said_by[k] for k in ("prefix", "grid", "loader") if k in said_by})
        origin = f"; the options {options} come from {' and '.join(given)}" if given else ""
        raise WeightsError(f"{file}: its head does not make an epviz '{name}' probe ({err}){origin}") from None
    with torch_errors(file, f"converting its head into {described}"):
        weights = _to_epviz(state, kind, shapes)
    check_weights_fit(
        weights,
        probe.state_dict(),
        file,
        described,
        fix="The file is damaged or holds another pooling's head: export the head again.",
    )
    with torch_errors(file, f"loading its head into {described}"):
        probe.load_state_dict(weights)
    record = {
        "format": REFERENCE,
        "layout": info["layout"],
        "file": str(file.resolve()),
        "cls_features": method if method is not None else {"ep": "ep", "lp": "cls"}[kind],
        "epoch": info.get("epoch", meta.get("head_epoch")),
        "val_acc1": info.get("val_acc1", meta.get("val_acc1_at_head_epoch")),
        "meta": {k: v for k, v in meta.items() if k not in ("prefix", "grid")},
        "args": {k: args[k] for k in _ARGS_KEPT if k in args},
    }
    check_nesting(record, str(file), "a head's metadata", "The file is damaged: export the head again.", error=WeightsError)
    probe.config["source"] = jsonable(record)
    target = resolve_device(device)
    with torch_errors(file, f"placing the probe on {target}"):
        return probe.to(target).eval()


def save_reference_head(probe: Probe, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write a probe in the reference's release format: ``ep_head.pth`` (``{"state_dict", "meta"}``) and ``config.json``.

    The ``.pth`` holds plain tensors, strings and numbers only (it loads with ``torch.load(...,
    weights_only=True)`` and no allow-list). The meta starts from the release meta of a probe loaded with
    :func:`load_reference_head`, then `meta`, then the probe's own facts: ``cls_features``, and for EP
    ``ep_queries`` and ``d_out``, for ep_all and cls epviz's ``prefix``.

    Args:
        probe: An ``ep``, ``ep_all``, ``cls`` or ``gap`` probe (gap is written as the reference's ``pos``).
        path: A folder (``<path>/ep_head.pth`` and ``<path>/config.json`` are written), or a ``.pth``
            file (its ``config.json`` is written beside it).
        meta: Reference metadata to record, e.g. ``method``, ``arch``, ``head_epoch``,
            ``val_acc1_at_head_epoch`` (percent, as the reference reports it); plain JSON values only.

    Returns:
        The path of the written ``.pth``.

    Raises:
        TypeError: `probe` is not a Probe, or `meta` holds values other than strings, numbers, booleans,
            None, lists and dicts.
        ConfigError: The probe is of a family the reference format has no head for, or `meta` contradicts
            the probe (``cls_features``, ``ep_queries``, ``d_out``).
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"save_reference_head expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    family = {"ep": "ep", "ep_all": "ep_all", "cls": "cls", "gap": "pos"}.get(probe.name)
    if family is None:
        raise ConfigError(
            f"probe '{probe.name}' has no counterpart in the reference's released heads: it writes EP, ep_all and "
            "linear (cls, gap) heads; save it with epviz.save_probe instead"
        )
    given = dict(meta or {})
    _check_plain(given, "meta")
    facts: dict[str, Any] = {"cls_features": family}
    if family in ("ep", "ep_all"):
        facts.update(ep_queries=int(probe.config["num_queries"]), d_out=int(probe.config["d_out"]))
    if family in ("ep_all", "cls"):
        facts["prefix"] = str(probe.prefix)
    clashes = {k: (given[k], v) for k, v in facts.items() if k in given and given[k] != v}
    if clashes:
        said = ", ".join(f"{k}={a!r} (the probe has {b!r})" for k, (a, b) in clashes.items())
        raise ConfigError(f"meta contradicts the probe: {said}; drop those entries, they are written from the probe")
    source = probe.config.get("source")
    inherited = source.get("meta", {}) if isinstance(source, Mapping) and source.get("format") == REFERENCE else {}
    doc = {
        **inherited,
        **given,
        **facts,
        "dim": probe.dim,
        "num_classes": probe.num_classes,
        "exported_by": f"epviz {__version__}",
    }
    doc = jsonable(doc)
    target = Path(path)
    pth = target if target.suffix == ".pth" else target / RELEASE_FILE
    state = _to_reference(probe, family)
    atomic_write(pth, lambda tmp: torch.save({"state_dict": state, "meta": doc}, tmp))
    text = json.dumps(doc, indent=1, allow_nan=False)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(pth.with_name(RELEASE_CONFIG), write_json)
    return pth


# --- reading -------------------------------------------------------------------------------


def _head_file(path: Path) -> Path:
    if path.is_dir():
        for name in (RELEASE_FILE, *_CHECKPOINTS):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no reference head: expected {RELEASE_FILE} (a released head) or "
            f"{' / '.join(_CHECKPOINTS)} (a training run's output folder)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"reference head {path} does not exist")
    return path


def _read(path: Path) -> object:
    """The unpickled file, allowing plain containers, tensors and the run arguments only."""
    check_archive(path)  # before torch.load inflates what the records declare
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not is_torch_checkpoint(path):
            raise WeightsError(
                f"cannot read {path}: it is not a torch checkpoint (neither a zip archive nor a pickle). Expected a "
                f"checkpoint of the reference ({' / '.join(_CHECKPOINTS)} or {RELEASE_FILE}); the file is damaged or "
                "of another format"
            ) from None
        needed = [g for g in unsafe_globals(path, err) if g not in _SAFE_NAMES]
        what = f"pickled objects of {', '.join(needed)}" if needed else "pickled objects"
        raise WeightsError(
            f"cannot read {path}: besides tensors and the run arguments (argparse.Namespace, paths) it needs {what}, "
            "and epviz does not unpickle other objects from weights files. On a machine where you trust the file, save "
            "the head alone (torch.save(ckpt['model'], 'head.pth')) or re-export it with the reference's tools/export_ep_heads.py"
        ) from None
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise WeightsError(
            f"cannot read {path}: {type(err).__name__}: {first}. Expected a torch checkpoint of the reference "
            f"({' / '.join(_CHECKPOINTS)} or {RELEASE_FILE}); the file is damaged or of another format"
        ) from None


def _unpack(loaded: object, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, facts) of a release, a training checkpoint or a bare state dict."""
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict: it is no reference head file")
    info: dict[str, Any] = {"meta": {}}
    if isinstance(loaded.get("state_dict"), Mapping):
        state = loaded["state_dict"]
        meta = loaded.get("meta")
        info.update(layout="release", meta=dict(meta) if isinstance(meta, Mapping) else {})
    elif isinstance(loaded.get("model"), Mapping):
        state = loaded["model"]
        args = loaded.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        info.update(layout="training checkpoint", args=dict(args) if isinstance(args, Mapping) else {})
        info["saved_module"] = loaded.get("saved_module")
        if isinstance(loaded.get("epoch"), int):
            info["epoch"] = loaded["epoch"]
        stats = loaded.get("test_stats")
        if isinstance(stats, Mapping) and isinstance(stats.get("test_acc1"), (int, float)):
            info["val_acc1"] = float(stats["test_acc1"])
    elif loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded
        info["layout"] = "state dict"
    else:
        raise WeightsError(
            f"{path} is a dict with keys {sorted(map(str, loaded))[:8]} but no head: a reference training checkpoint "
            f"keeps it under 'model', a released {RELEASE_FILE} under 'state_dict'"
        )
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise WeightsError(f"{path}: the head's state dict holds non-tensor entries {bad[:5]}; the file is damaged")
    return {str(k).removeprefix("module."): v for k, v in state.items()}, info


def _head_state(state: dict[str, torch.Tensor], saved_module: object, path: Path) -> dict[str, torch.Tensor]:
    """The head's own entries: a checkpoint of the whole model (``saved_module == 'full'``) keeps them under ``head.``."""
    if saved_module == "full" or (not any(k[:1].isdigit() for k in state) and any(k.startswith("head.") for k in state)):
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        if not head:
            raise WeightsError(f"{path} holds a whole model without a 'head.' module: there is no probe head to read")
        return head
    return state


def _recognise(state: Mapping[str, torch.Tensor], path: Path) -> tuple[str, dict[str, int]]:
    """("ep" or "lp", shapes {dim, classes, queries, d_out}) of a head state dict, or a WeightsError saying why not."""
    keys = set(state) - {"1.num_batches_tracked", "0.num_batches_tracked"}
    if "0.v.bias" in keys:
        raise WeightsError(
            f"{path}: its EP value projection has a bias (0.v.bias; trained with qkv_bias=True), which the EP of the "
            "paper and of epviz does not have"
        )
    if keys == _EP_KEYS:
        q, v = state["0.cls_token"], state["0.v.weight"]
        mean, var, w, b = state["1.running_mean"], state["1.running_var"], state["2.weight"], state["2.bias"]
        queries = q[0] if q.ndim == 3 and q.shape[0] == 1 else q
        ok = queries.ndim == 2 and v.ndim == 2 and w.ndim == 2 and b.ndim == 1
        if ok:
            m, dim = queries.shape
            width, classes = v.shape[0], w.shape[0]
            ok = (
                v.shape[1] == dim
                and width >= 1
                and dim % width == 0
                and mean.shape == var.shape == (width,)
                and w.shape[1] == width
                and b.shape == (classes,)
            )
        if not ok:
            raise WeightsError(
                f"{path}: the EP head's shapes do not fit together (cls_token {tuple(q.shape)}, v.weight {tuple(v.shape)}, "
                f"running_mean {tuple(mean.shape)}, classifier {tuple(w.shape)} + {tuple(b.shape)}); expected (1, M, D), "
                "(D/d_out, D), (D/d_out,), (C, D/d_out) + (C,). The file is damaged"
            )
        return "ep", _bounded({"dim": int(dim), "classes": int(classes), "queries": int(m), "d_out": int(dim // width)}, path)
    if keys == _LP_KEYS:
        mean, var, w, b = state["0.running_mean"], state["0.running_var"], state["1.weight"], state["1.bias"]
        if not (w.ndim == 2 and mean.shape == var.shape == (w.shape[1],) and b.shape == (w.shape[0],)):
            raise WeightsError(
                f"{path}: the linear head's shapes do not fit together (running_mean {tuple(mean.shape)}, classifier "
                f"{tuple(w.shape)} + {tuple(b.shape)}); expected (D,), (C, D) + (C,). The file is damaged"
            )
        return "lp", _bounded({"dim": int(w.shape[1]), "classes": int(w.shape[0])}, path)
    shown = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
    raise WeightsError(
        f"{path} holds a head with keys [{shown}], neither EP (0.cls_token, 0.v.weight, 1.running_*, 2.weight, 2.bias) "
        "nor linear probing (0.running_*, 1.weight, 1.bias): epviz reads the reference's EP, ep_all and LP heads; "
        "train the other poolings with epviz itself"
    )


def _bounded(shapes: dict[str, int], path: Path) -> dict[str, int]:
    """`shapes`, when each is at most :data:`~epviz.safe_load.MAX_SIZE` (a head's width, classes and queries)."""
    for key, value in shapes.items():
        if value > MAX_SIZE:
            raise WeightsError(
                f"{path}: its head's {key} is {value:,}, beyond the {MAX_SIZE:,} epviz reads for a probe head; "
                "the file is damaged or is not a probe head"
            )
    return shapes


def _probe_name(method: object, kind: str, path: Path, said_by: str) -> str:
    """The epviz probe of the reference's `method` (stated by `said_by`) for a head of `kind`."""
    if method is None:
        return "ep" if kind == "ep" else "cls"
    name = _METHODS.get(method) if isinstance(method, str) else None
    if name is None:
        raise WeightsError(
            f"{said_by}: cls_features is {method!r}; epviz reads the reference's {', '.join(_METHODS)} heads. "
            "Pass config={'cls_features': ...} if the file's metadata is wrong"
        )
    if (name in ("ep", "ep_all")) != (kind == "ep"):
        held = "an EP" if kind == "ep" else "a linear"
        raise WeightsError(
            f"{said_by}: cls_features says {method!r}, but the state dict of {path.name} holds {held} head; "
            "pass config={'cls_features': ...} to say what it is"
        )
    return name


def _check_args(args: Mapping[str, Any], shapes: Mapping[str, int], path: Path) -> None:
    """Refuse a checkpoint whose run arguments describe another head than its tensors."""
    said = {"ep_queries": "queries", "d_out": "d_out"} if "queries" in shapes else {}
    said["nb_classes"] = "classes"
    fix = "The file is damaged or was assembled from two runs: export the head again"
    wrong = []
    for arg, key in said.items():
        if args.get(arg) is None:
            continue
        value = config_int(args[arg], f"{path}: its args", arg, fix, error=WeightsError)
        if value != shapes[key]:
            wrong.append(f"{arg}={value} (the tensors say {shapes[key]})")
    if wrong:
        raise WeightsError(
            f"{path}: its args describe another head than its state dict: {', '.join(wrong)}. "
            "The file is damaged or was assembled from two runs: export the head again"
        )


def _to_epviz(state: Mapping[str, torch.Tensor], kind: str, shapes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The reference's Sequential keys as an epviz probe's state dict (float32, a count of 0 when missing)."""
    stage = {"ep": ("1", "2"), "lp": ("0", "1")}[kind]
    out: dict[str, torch.Tensor] = {}
    if kind == "ep":
        out["queries"] = state["0.cls_token"].reshape(shapes["queries"], shapes["dim"])
        out["value.weight"] = state["0.v.weight"]
    out["norm.running_mean"] = state[f"{stage[0]}.running_mean"]
    out["norm.running_var"] = state[f"{stage[0]}.running_var"]
    out["head.weight"] = state[f"{stage[1]}.weight"]
    out["head.bias"] = state[f"{stage[1]}.bias"]
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    count = state.get(f"{stage[0]}.num_batches_tracked")
    out["norm.num_batches_tracked"] = torch.tensor(0 if count is None else int(count), dtype=torch.long)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(
        path,
        what="a head's metadata (config.json)",
        fix="Pass the config.json released with the head, or config={...} with its entries.",
    )


# The metadata's numbers: (lowest, highest) of each integer, and the tensors' fact it states, where it states one.
_META_INTS = {
    "dim": (1, MAX_SIZE),
    "num_classes": (1, MAX_SIZE),
    "nb_classes": (1, MAX_SIZE),
    "ep_queries": (1, MAX_SIZE),
    "d_out": (1, MAX_SIZE),
    "image_size": (1, MAX_SIZE),
    "head_epoch": (0, 10**6),
}
_META_FACTS = {"dim": "dim", "num_classes": "classes", "nb_classes": "classes", "ep_queries": "queries", "d_out": "d_out"}
_META_PERCENTS = ("val_acc1_at_head_epoch", "table_best_acc1")


def _check_meta(
    docs: list[tuple[str, Mapping[str, Any], bool]], shapes: Mapping[str, int], file: Path
) -> tuple[dict[str, Any], dict[str, str]]:
    """The metadata of `docs` merged in order once its numbers are checked, and which document said each entry.

    Each document is (where, entries, written with the file): the checkpoint's own meta and ``config.json``
    beside it, then a ``config=`` file or mapping. Every number of :data:`_META_INTS` must be a JSON integer
    in range, the accuracies finite percentages, ``grid`` two integers; a number stating a fact of the
    tensors (width, classes, queries, d_out) must state the tensors' value; and the files written with the
    head may not give one number two values. The reference's exporter writes ``d_out: 1`` for every head
    (tools/export_ep_heads.py), so that value in a release file is the exporter's, not the head's: it is
    recorded as the tensors' d_out.

    Raises:
        ConfigError: Naming the file (or the config= argument), the field, both values and the fix.
    """
    merged: dict[str, Any] = {}
    said_by: dict[str, str] = {}
    stated: dict[str, tuple[str, Any]] = {}
    for where, doc, released in docs:
        entries = dict(doc)
        fix = (
            "Fix or remove that entry (the tensors say what the head is), or keep the head with its own config.json"
            if released
            else "Drop that entry from config=: the tensors say what the head is"
        )
        for key, value in doc.items():
            if value is None:
                continue
            if key in _META_INTS:
                low, high = _META_INTS[key]
                value = config_int(value, where, key, fix, low=low, high=high)
                fact = _META_FACTS.get(key, "")
                if fact in shapes and value != shapes[fact]:
                    if not (released and key == "d_out" and value == 1):
                        raise ConfigError(f"{where}: {key} is {value}, but the tensors of {file.name} say {shapes[fact]}. {fix}")
                    value = shapes[fact]  # the exporter's constant, not the head's
            elif key in _META_PERCENTS:
                value = config_number(value, where, key, fix, low=0, high=100)
            elif key == "grid":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ConfigError(f"{where}: grid is {value!r}; it must be [rows, cols] of the patch grid. {fix}")
                value = [config_int(v, where, "grid", fix) for v in value]
            else:
                continue
            if released and key in stated and stated[key][1] != value:
                first, said = stated[key]
                raise ConfigError(
                    f"{where}: {key} is {value}, but {first} says {said}: the two were not written together. Remove the "
                    "stale one, or export the head again"
                )
            if released:
                stated.setdefault(key, (where, value))
            entries[key] = value
        merged.update(entries)
        said_by.update(dict.fromkeys(map(str, entries), where))
    return merged, said_by


# --- writing -------------------------------------------------------------------------------


def _to_reference(probe: Probe, family: str) -> dict[str, torch.Tensor]:
    """The probe's state as the reference's Sequential keys (plain CPU tensors)."""
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in probe.state_dict().items()}
    stage = ("1", "2") if family in ("ep", "ep_all") else ("0", "1")
    out: dict[str, torch.Tensor] = {}
    if family in ("ep", "ep_all"):
        out["0.cls_token"] = sd["queries"].unsqueeze(0)
        out["0.v.weight"] = sd["value.weight"]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        out[f"{stage[0]}.{key}"] = sd[f"norm.{key}"]
    out[f"{stage[1]}.weight"] = sd["head.weight"]
    out[f"{stage[1]}.bias"] = sd["head.bias"]
    return out


def _check_plain(value: object, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; keys must be strings")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; the reference format stores plain values only "
        "(strings, numbers, booleans, None, lists, dicts)"
    )
