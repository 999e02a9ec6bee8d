"""Saved probes: weights in safetensors beside a JSON of their build options and fit summary.

Both files are written atomically; loading rebuilds the probe from the registry and reads the
weights without unpickling anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from epviz.atomic import atomic_write
from epviz.backbones.loader import check_finite_weights, check_weights_fit
from epviz.errors import WeightsError
from epviz.probes import Probe, build
from epviz.runtime import resolve_device

__all__ = ["FORMAT", "finite_or_none", "load_probe", "save_probe"]

FORMAT = "epviz-probe/1"


def save_probe(probe: Probe, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a probe's weights to ``<path>.safetensors`` and its build options (plus `extra`) to ``<path>.json``.

    Both files are written to temporary names and moved into place, so a reader never
    sees a half-written file. Returns `<path>` without suffix.

    Raises:
        TypeError: `probe` is not a Probe, or `extra` is not a dict.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"save_probe expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of JSON-able values (or None), got {type(extra).__name__}")
    base = _base_path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    atomic_write(base.with_name(base.name + ".safetensors"), lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    doc = {"format": FORMAT, "probe": probe.config, **(extra or {})}
    text = json.dumps(_jsonable(doc), indent=2, allow_nan=False)

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
    return probe.to(resolve_device(device)).eval()


def _base_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _jsonable(obj):
    """`obj` with NaN/inf as None, numpy scalars as Python numbers, tuples as lists, other objects as str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
