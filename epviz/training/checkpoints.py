"""Saved probes: weights in safetensors beside a JSON of their build options, fit summary and model card.

Both files are written atomically; loading rebuilds the probe from the registry and reads the
weights without unpickling anything. The JSON's ``card`` (:func:`model_card`) says in one place what
the probe is: backbone, layer, token cache, fit options, selected epoch, accuracies, protocol, the
learning rate a tuned run chose, and where a probe that was not trained here comes from; files written
before the card existed still load, and :func:`read_model_card` rebuilds their card from the summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from epviz.atomic import atomic_write
from epviz.backbones.loader import check_weights_fit
from epviz.errors import WeightsError
from epviz.probes import Probe, build
from epviz.provenance import jsonable
from epviz.runtime import resolve_device
from epviz.safe_load import MAX_PARAMETERS, MAX_SIZE, check_weights, config_int, read_json, torch_errors

__all__ = ["FORMAT", "RECORD_KEYS", "finite_or_none", "load_probe", "model_card", "read_model_card", "save_probe"]

FORMAT = "epviz-probe/1"

RECORD_KEYS = ("source",)
"""Keys of ``probe.config`` that record facts about a probe rather than build it (``source``: where a head
loaded from another format comes from, see :func:`epviz.training.load_reference_head`)."""

_FIT_OPTIONS = (
    "epochs",
    "epochs_run",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "early_stopping",
    "precision",
    "device",
    "torch_threads",
    "seed",
)


def save_probe(
    probe: Probe, path: str | os.PathLike, extra: dict | None = None, *, card: Mapping[str, Any] | None = None
) -> Path:
    """Write a probe's weights to ``<path>.safetensors`` and its build options, `extra` and model card to ``<path>.json``.

    Both files are written to temporary names and moved into place, so a reader never
    sees a half-written file. The JSON records the weights file's sha256 (``weights_sha256``), which
    :func:`load_probe` checks: safetensors has no checksum of its own, and a damaged byte would load as a
    silently different weight. Returns `<path>` without suffix.

    Args:
        probe: The probe to save.
        path: `<path>` (a ``.json`` or ``.safetensors`` suffix is dropped).
        extra: JSON-able values stored beside the build options (:meth:`FitResult.save` passes its fit
            summary: ``fit``, ``history``, ``best_epoch``, ``best_acc``, ...).
        card: Entries of the model card that `extra` cannot know, e.g. ``{"test_acc": 0.81}``; they
            replace the derived ones (see :func:`model_card`).

    Raises:
        TypeError: `probe` is not a Probe, `extra` is not a dict, or `card` is not a mapping.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"save_probe expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of JSON-able values (or None), got {type(extra).__name__}")
    if card is not None and not isinstance(card, Mapping):
        raise TypeError(f"card must be a mapping of JSON-able values (or None), got {type(card).__name__}")
    base = _base_path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    data = safetensors_bytes(tensors, metadata={"format": FORMAT})
    atomic_write(base.with_name(base.name + ".safetensors"), lambda tmp: Path(tmp).write_bytes(data))
    doc = {"format": FORMAT, "probe": probe.config, **(extra or {}), "weights_sha256": hashlib.sha256(data).hexdigest()}
    doc["card"] = model_card(probe.config, doc, card)
    text = json.dumps(jsonable(doc), indent=2, allow_nan=False)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(base.with_name(base.name + ".json"), write_json)
    return base


def load_probe(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Probe:
    """Rebuild a probe saved by :meth:`FitResult.save` or :func:`save_probe`, in eval mode.

    Nothing the files declare is allocated before it is checked: the JSON is read within
    :data:`~epviz.safe_load.MAX_JSON_BYTES` and :data:`~epviz.safe_load.MAX_JSON_DEPTH`; ``dim`` and
    ``num_classes`` are JSON integers up to :data:`~epviz.safe_load.MAX_SIZE`; the probe the JSON
    describes is first built on the meta device (no memory), and its options, its number of values
    (at most :data:`~epviz.safe_load.MAX_PARAMETERS`) and its tensors' shapes are compared with what
    the JSON states and with the safetensors header; only then is it built and the weights read and
    checked (:func:`~epviz.safe_load.check_weights`, and the sha256 the JSON records).

    Args:
        path: `<path>`, `<path>.json` or `<path>.safetensors`.
        device: Where to place the probe.

    Raises:
        FileNotFoundError: One of the two files is missing.
        WeightsError: The JSON is not an epviz probe file, is too large or too deep, states a number as
            something else than a JSON integer or out of bounds, or describes a probe that cannot be built
            or that reads its options otherwise; the weights cannot be read, their keys or shapes do not fit
            the probe the JSON describes, they hold NaN or inf or a negative BatchNorm variance, or their
            sha256 is not the one the JSON records; or torch fails (out of memory) building or placing the
            probe. Every message names the file.
    """
    base = _base_path(path)
    meta_path, weights_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")
    for p in (meta_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"no saved probe at {base}: {p.name} is missing")
    doc = _read_doc(meta_path)
    fix = "save the probe again with save_probe"
    if not isinstance(doc.get("probe"), dict):
        raise WeightsError(f"{meta_path}: its 'probe' entry is {doc.get('probe')!r}, not the object of build options; {fix}")
    options = dict(doc["probe"])
    records = {key: options.pop(key) for key in RECORD_KEYS if key in options}
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise WeightsError(f"{meta_path}: probe field 'name' is {name!r}; it must be a registered probe name (a string). {fix}")
    dim, num_classes = (
        config_int(options.pop(key, None), str(meta_path), f"probe field {key!r}", fix=fix.capitalize(), error=WeightsError)
        for key in ("dim", "num_classes")
    )
    _check_option_sizes(options, meta_path)
    described = f"the probe its JSON describes ('{name}', dim={dim}, num_classes={num_classes})"
    stored = _stored_shapes(weights_path)
    try:
        with torch.device("meta"):  # shapes only: nothing the JSON declares is allocated yet
            shell = build(name, dim, num_classes, **options)
    except (KeyError, TypeError, ValueError, RuntimeError, MemoryError, OverflowError) as err:
        raise WeightsError(
            f"{meta_path} describes a probe that cannot be built ({type(err).__name__}: {err}); if it is a plugin's "
            "probe family, import the plugin first"
        ) from None
    _check_options_as_read(options, shell, meta_path)
    expected = shell.state_dict()
    size = sum(t.numel() for t in expected.values())
    if size > MAX_PARAMETERS:
        raise WeightsError(
            f"{meta_path} describes a '{name}' probe (dim={dim}, num_classes={num_classes}) of {size:,} values, more than "
            f"the {MAX_PARAMETERS:,} epviz builds; the JSON is damaged: {fix}"
        )
    fit_fix = (
        f"{meta_path.name} and {weights_path.name} come from different probes: save the probe again, or pair "
        f"{weights_path.name} with the JSON written beside it."
    )
    check_weights_fit(stored, expected, weights_path, described, fix=fit_fix)
    with torch_errors(meta_path, f"building {described}"):
        probe = build(name, dim, num_classes, **options)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise WeightsError(
            f"cannot read probe weights from {weights_path}: {type(err).__name__}: {err}; save the probe again"
        ) from None
    check_weights(state, weights_path, max_parameters=MAX_PARAMETERS)
    _check_sha256(doc.get("weights_sha256"), weights_path, meta_path)
    with torch_errors(weights_path, f"loading the weights into {described}"):
        probe.load_state_dict(state)
    probe.config.update(records)
    target = resolve_device(device)
    with torch_errors(weights_path, f"placing the probe on {target}"):
        return probe.to(target).eval()


def model_card(
    config: Mapping[str, Any], summary: Mapping[str, Any] | None = None, card: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The model card of a probe: what it is, what it was trained on and how well it does.

    Args:
        config: The probe's build options (``probe.config``).
        summary: The fit summary saved beside it (what :meth:`FitResult.save` passes to :func:`save_probe`:
            ``fit`` (:attr:`FitResult.config`), ``best_epoch``, ``best_acc``, ``final_acc``), or None.
        card: Entries that replace the derived ones (``test_acc`` is known only from here or the summary's ``test_acc``).

    Returns:
        ``probe``, ``backbone``, ``layer``, ``token_cache`` (the token cache folder the training tokens
        came from), ``dataset``, ``train_size``, ``val_size``, ``protocol``, ``fit`` (epochs, batch size,
        optimizer, lr, weight decay, warm-up, label smoothing, early stopping, precision, device, torch threads, seed),
        ``selected_epoch``, ``val_acc`` (at the selected epoch), ``final_val_acc``, ``test_acc``,
        ``tuned`` (for a run tuned on a grid: the chosen ``lr`` and ``weight_decay``, the grid and what it
        was selected on; else None), ``probe_cache`` (its key when it came from the probe cache) and
        ``source`` (where a head not trained by epviz comes from); None where unknown.
    """
    summary = summary or {}
    fit = _mapping(summary.get("fit"))
    origin = _mapping(fit.get("train_origin"))
    tuned = None
    if isinstance(fit.get("grid"), Mapping):
        grid, chosen = fit["grid"], _mapping(fit["grid"].get("chosen"))
        tuned = {
            "lr": chosen.get("lr", fit.get("lr")),
            "weight_decay": chosen.get("weight_decay", fit.get("weight_decay")),
            "lrs": grid.get("lrs"),
            "weight_decays": grid.get("weight_decays"),
            "train_size": grid.get("train_size"),
            "selected_on": grid.get("selected_on"),
        }
    doc: dict[str, Any] = {
        "probe": config.get("name"),
        "backbone": fit.get("backbone", origin.get("backbone")),
        "layer": fit.get("layer", origin.get("layer")),
        "token_cache": origin.get("cache"),
        "dataset": origin.get("dataset"),
        "train_size": fit.get("train_size"),
        "val_size": fit.get("val_size"),
        "protocol": fit.get("protocol"),
        "fit": {key: fit[key] for key in _FIT_OPTIONS if key in fit} or None,
        "selected_epoch": summary.get("best_epoch"),
        "val_acc": summary.get("best_acc"),
        "final_val_acc": summary.get("final_acc"),
        "test_acc": summary.get("test_acc"),
        "tuned": tuned,
        "probe_cache": fit.get("cached"),
        "source": config.get("source"),
    }
    doc.update(card or {})
    return jsonable(doc)


def read_model_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a saved probe (see :func:`model_card`), rebuilt from the summary for files without one.

    Args:
        path: `<path>`, `<path>.json` or `<path>.safetensors`.

    Raises:
        FileNotFoundError: ``<path>.json`` is missing.
        WeightsError: The JSON is not an epviz probe file.
    """
    base = _base_path(path)
    meta_path = base.with_name(base.name + ".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"no saved probe at {base}: {meta_path.name} is missing")
    doc = _read_doc(meta_path)
    if not isinstance(doc.get("probe"), dict):
        raise WeightsError(f"{meta_path}: its 'probe' entry is {doc.get('probe')!r}, not the object of build options")
    card = doc.get("card")
    return dict(card) if isinstance(card, dict) else model_card(doc["probe"], doc)


def _read_doc(meta_path: Path) -> dict[str, Any]:
    """A saved probe's JSON, read within the bounds of :func:`~epviz.safe_load.read_json`, of this format."""
    doc = read_json(meta_path, what="a saved probe's JSON", fix="Save the probe again with save_probe.", error=WeightsError)
    if doc.get("format") != FORMAT:
        raise WeightsError(f"{meta_path} is not an epviz probe file (format {doc.get('format')!r}, expected {FORMAT!r})")
    return doc


def _check_option_sizes(options: Mapping[str, Any], meta_path: Path) -> None:
    """Refuse build options stating numbers beyond :data:`~epviz.safe_load.MAX_SIZE` (queries, heads, grid), or long lists."""
    todo: list[tuple[str, Any]] = list(options.items())
    while todo:
        key, value = todo.pop()
        if isinstance(value, (list, tuple)):
            if len(value) > 16:
                raise WeightsError(f"{meta_path}: probe field {key!r} lists {len(value)} values; build options hold a few")
            todo.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= MAX_SIZE:
            raise WeightsError(
                f"{meta_path}: probe field {key!r} is {value}, beyond the {MAX_SIZE:,} epviz accepts for a size; "
                "the JSON is damaged: save the probe again with save_probe"
            )
        elif isinstance(value, str) and len(value) > 1000:
            raise WeightsError(f"{meta_path}: probe field {key!r} is a string of {len(value):,} characters; the JSON is damaged")


def _check_options_as_read(options: Mapping[str, Any], probe: Probe, meta_path: Path) -> None:
    """Refuse options the probe reads as another value than the JSON states ("16" for 16, true for 1, 2.5 for 2)."""
    built = jsonable(probe.config)
    for key, declared in options.items():
        if key in built and not _same_value(declared, built[key]):
            raise WeightsError(
                f"{meta_path}: probe field {key!r} is {json.dumps(declared)}, which the '{probe.name}' probe reads as "
                f"{json.dumps(built[key])}; write {json.dumps(built[key])} in the JSON if that is what it means, or save the "
                "probe again with save_probe"
            )


def _same_value(declared: Any, built: Any) -> bool:
    """Whether a JSON value states `built` exactly: numbers by value (not from strings or booleans), the rest by type and value."""
    if isinstance(built, bool) or isinstance(declared, bool):
        return type(declared) is type(built) and declared == built
    if isinstance(built, (int, float)):
        return isinstance(declared, (int, float)) and declared == built
    if isinstance(built, list):
        return isinstance(declared, list) and len(declared) == len(built) and all(map(_same_value, declared, built))
    if isinstance(built, dict):
        return (
            isinstance(declared, dict)
            and declared.keys() == built.keys()
            and all(_same_value(declared[k], built[k]) for k in built)
        )
    return type(declared) is type(built) and declared == built


def _check_sha256(recorded: object, weights_path: Path, meta_path: Path) -> None:
    """Refuse weights whose sha256 is not the one `meta_path` records (files saved before the record pass)."""
    if recorded is None:
        return
    if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise WeightsError(f"{meta_path}: weights_sha256 is {recorded!r}, not a sha256 hex digest; save the probe again")
    digest = hashlib.sha256()
    with open(weights_path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        raise WeightsError(
            f"{weights_path} has sha256 {digest.hexdigest()[:16]}..., but {meta_path.name} records {recorded[:16]}...: the "
            "weights were changed or damaged after saving, or belong to another probe. Save the probe again"
        )


def _stored_shapes(weights_path: Path) -> dict[str, torch.Tensor]:
    """The safetensors file's tensors as meta tensors of their shapes, read from its header (no values)."""
    try:
        with safe_open(str(weights_path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise WeightsError(
            f"cannot read probe weights from {weights_path}: {type(err).__name__}: {err}; save the probe again"
        ) from None
    total = sum(math.prod(shape) for shape in shapes.values())
    if total > MAX_PARAMETERS:
        raise WeightsError(
            f"{weights_path} declares {total:,} values, more than the {MAX_PARAMETERS:,} epviz reads as a probe; "
            "save the probe again"
        )
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def _base_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
