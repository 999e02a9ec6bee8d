"""Saved probes: weights in safetensors beside a JSON of their build options, fit summary and model card.

Both files are written atomically; loading rebuilds the probe from the registry and reads the
weights without unpickling anything. The JSON's ``card`` (:func:`model_card`) says in one place what
the probe is: backbone, layer, token cache, fit options, selected epoch, accuracies, protocol, the
learning rate a tuned run chose, and where a probe that was not trained here comes from; files written
before the card existed still load, and :func:`read_model_card` rebuilds their card from the summary.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from epviz.atomic import atomic_write
from epviz.backbones.loader import check_finite_weights, check_weights_fit
from epviz.errors import WeightsError
from epviz.probes import Probe, build
from epviz.provenance import jsonable
from epviz.runtime import resolve_device

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
    sees a half-written file. Returns `<path>` without suffix.

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
    atomic_write(base.with_name(base.name + ".safetensors"), lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    doc = {"format": FORMAT, "probe": probe.config, **(extra or {})}
    doc["card"] = model_card(probe.config, doc, card)
    text = json.dumps(jsonable(doc), indent=2, allow_nan=False)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(base.with_name(base.name + ".json"), write_json)
    return base


def load_probe(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Probe:
    """Rebuild a probe saved by :meth:`FitResult.save` or :func:`save_probe`, in eval mode.

    Args:
        path: `<path>`, `<path>.json` or `<path>.safetensors`.
        device: Where to place the probe.

    Raises:
        FileNotFoundError: One of the two files is missing.
        WeightsError: The JSON is not an epviz probe file or describes a probe that cannot be built,
            the weights cannot be read, their keys or shapes do not fit the probe the JSON describes,
            or they hold NaN or inf.
    """
    base = _base_path(path)
    meta_path, weights_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")
    for p in (meta_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"no saved probe at {base}: {p.name} is missing")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{meta_path} is not readable JSON ({err}); save the probe again with save_probe") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise WeightsError(f"{meta_path} is not an epviz probe file (format {found!r}, expected {FORMAT!r})")
    try:
        options = dict(doc["probe"])
        records = {key: options.pop(key) for key in RECORD_KEYS if key in options}
        name, dim, num_classes = options.pop("name"), options.pop("dim"), options.pop("num_classes")
        probe = build(name, dim, num_classes, **options)
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(
            f"{meta_path} describes a probe that cannot be built ({type(err).__name__}: {err}); if it is a plugin's "
            "probe family, import the plugin first"
        ) from None
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise WeightsError(
            f"cannot read probe weights from {weights_path}: {type(err).__name__}: {err}; save the probe again"
        ) from None
    described = f"the probe its JSON describes ('{name}', dim={dim}, num_classes={num_classes})"
    check_weights_fit(
        state,
        probe.state_dict(),
        weights_path,
        described,
        fix=f"The two files come from different probes: save the probe again, or pair {weights_path.name} "
        "with the JSON written beside it.",
    )
    check_finite_weights(state, weights_path)
    probe.load_state_dict(state)
    probe.config.update(records)
    return probe.to(resolve_device(device)).eval()


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
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{meta_path} is not readable JSON ({err}); save the probe again with save_probe") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("probe"), dict):
        found = doc.get("format") if isinstance(doc, dict) else None
        raise WeightsError(f"{meta_path} is not an epviz probe file (format {found!r}, expected {FORMAT!r})")
    card = doc.get("card")
    return dict(card) if isinstance(card, dict) else model_card(doc["probe"], doc)


def _base_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
