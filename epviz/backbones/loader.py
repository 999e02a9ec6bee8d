"""Frozen backbones: any timm ViT (hub or local weights) or an embedded zoo model.

``load_backbone`` returns a :class:`Backbone`, which knows everything the later stages
need: the number of prefix tokens ([CLS] and registers), the patch grid, the token
width, the depth, the input normalisation and a hash of the weights (for cache keys).

Offline behaviour: hub weights are looked up in the local Hugging Face cache first and
loaded from there without any network call. When they are not cached, a short
reachability check of the hub (or ``HF_HUB_OFFLINE=1``) turns what would be a minute
of retries into an immediate, explicit error.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import hashlib
import math
import numbers
import os
import pickle
import re
import socket
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from epviz.backbones import presets, zoo
from epviz.errors import ConfigError, WeightsError
from epviz.runtime import resolve_device
from epviz.safe_load import check_archive, check_weights, is_torch_checkpoint, strip_ansi, torch_errors, unsafe_globals

__all__ = [
    "Backbone",
    "load_backbone",
    "BackboneError",
    "HubUnavailable",
    "available_backbones",
    "present_backbones",
    "check_weights_fit",
]

HUB_HOST_ENV = "EPVIZ_HUB_HOST"
_HUB_TIMEOUT = 1.5


class BackboneError(WeightsError):
    """A backbone could not be built or loaded (message says why and what to do)."""


class HubUnavailable(BackboneError):
    """Pretrained weights are neither cached locally nor reachable on the hub."""


@dataclass
class Backbone:
    """A frozen ViT plus the facts about its tokens.

    Attributes:
        model: The timm model, in eval mode, gradients off.
        name: The name it was loaded by (zoo name or timm name).
        num_prefix_tokens: [CLS] plus register tokens (0 for GAP-only models).
        grid: Patch grid (rows, cols).
        dim: Token width D.
        depth: Number of blocks; layer indices run 0 .. depth - 1.
        image_size: Input (height, width) in pixels.
        mean: Per-channel input mean.
        std: Per-channel input std.
        weights_id: Identity of the weights (sha256 of the state dict or file), for cache keys.
        card: Extra facts (zoo model card, pretrained config).
    """

    model: nn.Module
    name: str
    num_prefix_tokens: int
    grid: tuple[int, int]
    dim: int
    depth: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str
    card: dict = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        """N, the number of patch tokens."""
        return self.grid[0] * self.grid[1]

    def resolve_layers(self, layers: int | list[int] | tuple[int, ...] | None) -> list[int]:
        """Normalise layer indices: 0 is block 0, -1 the last block; None means every block.

        Raises:
            ConfigError: An index is out of range or not an integer, no index is given, or one block is named twice.
        """
        if layers is None:
            return list(range(self.depth))
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
            layers = [layers]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ConfigError(
                f"layers must be a block index or a list of them (0 is the first block, -1 the last), got {layers!r}"
            )
        layers = list(layers)
        if not layers:
            raise ConfigError(
                f"layers is empty: name at least one block of {self.name} (0..{self.depth - 1}), or None for every block"
            )
        out: list[int] = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ConfigError(f"layer indices must be integers, got {layer!r} in layers={layers}")
            layer = int(layer)
            if not -self.depth <= layer < self.depth:
                raise ConfigError(
                    f"layer {layer} is out of range for {self.name}, which has {self.depth} blocks (layers={layers}): "
                    f"use 0..{self.depth - 1} (0 is the first block) or -1..-{self.depth} (-1 is the last)"
                )
            out.append(layer % self.depth)
        if len(set(out)) != len(out):
            raise ConfigError(f"layers {layers} name the same block twice; list each block once")
        return out

    @property
    def final_norm(self) -> bool:
        """Whether the reference implementation reads this encoder's blocks through its final norm.

        ``card["final_norm"]`` when set (presets), else the preset rule of its name (False for plain
        timm names and the zoo); :func:`epviz.extract_tokens` and :func:`epviz.fit_images` follow it by default.
        """
        value = self.card.get("final_norm")
        return presets.default_norm(self.name) if value is None else bool(value)

    def prepare(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or float in [0, 1], as the model's normalised input on `device`.

        Images of another size are resized to the model's input size (bicubic, antialiased).

        Raises:
            ValueError: Not a (B, 3, H, W) tensor (the message names grayscale or RGBA inputs).
        """
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"images must be tensors shaped (B, 3, H, W); got {getattr(images, 'shape', type(images))}")
        if images.shape[1] != 3:
            kind = {1: "grayscale", 4: "RGBA", 2: "grayscale+alpha"}.get(images.shape[1], f"{images.shape[1]}-channel")
            raise ValueError(
                f"the dataset yields {kind} images (shape {tuple(images.shape)}); the backbone needs RGB: "
                "convert them (e.g. PIL .convert('RGB')) in the dataset"
            )
        images = images.to(device)
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (images - mean) / std

    def block_tokens(
        self, images: torch.Tensor, layers: Iterable[int], norm: bool | None, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block of `layers` (resolved indices), the patch (B, N, D) and prefix (B, P, D) tokens of `images`.

        One forward pass up to the deepest block (timm ``forward_intermediates``); `norm` applies the
        encoder's final norm to each block output (None: :attr:`final_norm`). Gradients and autocast are
        the caller's.
        """
        model: Any = self.model  # a timm VisionTransformer: forward_intermediates is not nn.Module's
        return model.forward_intermediates(
            self.prepare(images, device),
            indices=list(layers),
            norm=self.final_norm if norm is None else norm,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
            stop_early=True,
        )

    def describe(self) -> dict:
        """A JSON-able summary (used in reports and cache keys)."""
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid),
            "dim": self.dim,
            "depth": self.depth,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def available_backbones(pattern: str = "vit*") -> list[str]:
    """Zoo names plus timm ViT-like model names matching `pattern`."""
    return list(zoo.ZOO) + timm.list_models(pattern)


def _state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _describe_model(model: nn.Module, name: str, weights_id: str, card: dict, mean=None, std=None) -> Backbone:
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise BackboneError(f"{name} is not a ViT-style timm model with forward_intermediates(); epviz needs patch tokens")
    vit = cast(Any, model)  # a timm ViT: patch_embed, embed_dim, blocks / stages are not nn.Module's attributes
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    img = tuple(int(s) for s in vit.patch_embed.img_size)
    blocks = getattr(model, "blocks", None)
    depth = len(blocks) if blocks is not None else len(vit.stages)
    return Backbone(
        model=_freeze(model),
        name=name,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        grid=(grid[0], grid[1]),
        dim=int(vit.embed_dim),
        depth=int(depth),
        image_size=(img[0], img[1]),
        mean=tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(std or cfg.get("std", (0.229, 0.224, 0.225))),
        weights_id=weights_id,
        card=card,
    )


def _load_zoo(name: str) -> Backbone:
    from safetensors.torch import load_file

    path = zoo.zoo_weights(name)
    if zoo.ENTRIES[name].file and not path.is_file():
        raise BackboneError(f"the weights of {name} ({path}) are missing; reinstall epviz or run scripts/train_zoo.py (make zoo)")
    card = zoo.zoo_card(name)
    model = zoo.build_zoo_vit()
    if name in ("tiny-random", "tiny-mae@0"):  # the 20-epoch MAE run starts from tiny-random's weights
        model.load_state_dict(zoo.random_state_dict())
        weights_id = f"tiny-random-seed{zoo.RANDOM_SEED}"
    elif name == "tiny-pixels":
        model, weights_id = zoo.PixelPatches(), "tiny-pixels"
    else:
        weights_id = zoo.file_sha256(path)
        if card.get("sha256") and card["sha256"] != weights_id:
            raise BackboneError(f"{path} does not match the sha256 in its model card; the file is corrupt — reinstall epviz")
        model.load_state_dict(load_file(str(path)))
    norm = card.get("normalization", zoo.NORMALIZATION)
    return _describe_model(model, name, weights_id, card, mean=norm["mean"], std=norm["std"])


def _conversion_hint(path: Path, globals_: list[str]) -> str:
    """A snippet that converts a checkpoint with benign pickled objects into safetensors."""
    modules = sorted({g.rsplit(".", 1)[0] for g in globals_ if "." in g})
    imports = "".join(f"; import {m}" for m in modules)
    allowed = ", ".join(globals_) or "..."
    target = path.with_suffix(".safetensors")
    return (
        "Convert it once, on a machine where you trust the file, and load the result:\n"
        f"    import torch{imports}; from safetensors.torch import save_file\n"
        f"    with torch.serialization.safe_globals([{allowed}]):\n"
        f"        ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
        f"    save_file({{k: v.contiguous() for k, v in ckpt['model'].items()}}, {str(target)!r})  # 'model': the key holding the state dict\n"
        f"then pass weights={str(target)!r}. epviz itself never unpickles such objects."
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch checkpoint, never unpickling arbitrary objects.

    Raises:
        BackboneError: The file is missing, unreadable, holds pickled objects other than tensors
            (the message names them and shows how to convert the file), or holds no state dict.
    """
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        check_archive(path, error=BackboneError)  # before torch.load inflates what the records declare
    state: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not is_torch_checkpoint(path):
            raise BackboneError(
                f"cannot read weights from {path}: it is neither a safetensors file nor a torch checkpoint (the file is "
                "damaged or of another format). epviz reads .safetensors files and torch checkpoints of plain tensors"
            ) from None
        globals_ = unsafe_globals(path, err)
        if not globals_:
            raise BackboneError(
                f"cannot read weights from {path}: it is a pickled checkpoint that does not load with weights_only=True "
                f"({strip_ansi(str(err)).strip().splitlines()[0][:200]}). epviz reads .safetensors files and torch checkpoints "
                "of plain tensors only; save the state dict with safetensors.torch.save_file"
            ) from None
        raise BackboneError(
            f"cannot read weights from {path}: besides tensors it holds pickled Python objects of {', '.join(globals_)} "
            "(often the training arguments saved next to the state dict, as MAE and DeiT releases do), and epviz "
            "does not unpickle objects from weights files. " + _conversion_hint(path, globals_)
        ) from None
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        first = (strip_ansi(str(err)).strip().splitlines() or [""])[0][:200]
        raise BackboneError(
            f"cannot read weights from {path}: {type(err).__name__}: {first}. "
            "epviz reads .safetensors files and torch checkpoints of plain tensors (weights_only=True)"
        ) from err
    for key in ("model", "state_dict", "module", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _first(items: list, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _vit_facts(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Width, patch size, depth and position-embedding length of a ViT state dict (those it holds)."""
    facts: dict[str, object] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        facts["width"] = int(proj.shape[0])
        facts["patch"] = int(proj.shape[2]) if proj.shape[2] == proj.shape[3] else f"{proj.shape[2]}x{proj.shape[3]}"
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if blocks:
        facts["blocks"] = max(blocks) + 1
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        positions = int(pos.shape[1])
        facts["positions"] = positions
        prefix = int("cls_token" in state) + (
            int(state["reg_token"].shape[1]) if "reg_token" in state and state["reg_token"].ndim == 3 else 0
        )
        for extra in dict.fromkeys((prefix, 0, 1)):
            side = math.isqrt(max(positions - extra, 0))
            if side and side * side == positions - extra:
                facts["grid"] = side
                break
    return facts


def _describe_misfit(found: dict, expected: dict) -> str:
    """ "checkpoint has width 96 and patch 16; the model expects width 192 and patch 8" (the facts that differ)."""
    names = {"width": "width {}", "patch": "patch {}", "blocks": "{} blocks", "positions": "position embeddings for {} tokens"}
    differ = [k for k in names if k in found and k in expected and found[k] != expected[k]]
    if "width" in differ or "patch" in differ:  # name both, so the two halves compare at a glance; positions follow from them
        keys = [k for k in ("width", "patch") if k in found and k in expected] + (["blocks"] if "blocks" in differ else [])
    else:
        keys = differ
    if not keys:
        return ""
    hint = ""
    if keys == ["positions"]:
        size = ""
        if "grid" in found and isinstance(found.get("patch"), int):
            size = f" (a {found['grid']}x{found['grid']} patch grid: img_size={found['grid'] * found['patch']})"
        hint = (
            f": the file was trained for another input size{size}; pass img_size= to match it, "
            "epviz does not resample position embeddings"
        )
    return (
        f"checkpoint has {' and '.join(names[k].format(found[k]) for k in keys)}; "
        f"the model expects {' and '.join(names[k].format(expected[k]) for k in keys)}{hint}"
    )


def check_weights_fit(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: str | Path,
    target: str,
    fix: str,
    error: type[WeightsError] = WeightsError,
) -> None:
    """Refuse a state dict whose keys or shapes do not fit a model, before ``load_state_dict`` sees it.

    The first line of the message says what does not fit (for a ViT: width, patch size, depth,
    position embeddings), then the file, the tensors of other shapes, and the missing and
    unexpected keys (the first few of each). Nothing is resampled.

    Args:
        state: The state dict read from `path`.
        expected: The model's own ``state_dict()``.
        path: The file, for the message.
        target: What it should fit, e.g. "test_vit" or "probe 'ep' (dim 16, 3 classes)".
        fix: The last sentence: what to do.
        error: The WeightsError subclass to raise.

    Raises:
        WeightsError: Keys are missing or unexpected, or shapes differ.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and _shape(state[k]) != _shape(expected[k])]
    mismatched.sort(key=lambda k: k.startswith("blocks."))  # the telling ones (patch_embed, pos_embed) first
    if not (missing or unexpected or mismatched):
        return
    summary = _describe_misfit(_vit_facts(state), _vit_facts(expected))
    if not summary:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} tensors have other shapes, e.g. {k} {_shape(state[k])} in the file, {_shape(expected[k])} expected"
            )
        if missing:
            parts.append(f"{len(missing)} expected tensors are missing")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not part of it")
        summary = "; ".join(parts)
    lines = [f"{path} does not fit {target}: {summary}"]
    if mismatched:
        shapes = [f"{k} {_shape(state[k])} vs {_shape(expected[k])}" for k in mismatched]
        lines.append(f"  tensors of other shapes (file vs expected): {_first(shapes)}")
    if missing:
        lines.append(f"  missing keys: {_first(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_first(unexpected)}")
    lines.append(fix)
    raise error("\n".join(lines))


def _hub_reachable(host: str) -> bool:
    def connect() -> bool:
        with socket.create_connection((host, 443), timeout=_HUB_TIMEOUT):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=_HUB_TIMEOUT + 0.2)
    except Exception:  # noqa: BLE001 - DNS failure, refusal and time-out all mean "not reachable"
        return False
    finally:
        pool.shutdown(wait=False)


def _cached_hub_file(cfg: dict) -> str | None:
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _check_name(name: str) -> None:
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    names = list(zoo.ZOO) + timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(
        f"unknown backbone {name!r}.{hint} Zoo backbones: {', '.join(zoo.ZOO)}; any timm ViT name works (timm.list_models('vit*'))."
    )


def load_backbone(
    name: str, weights: str | Path | None = None, pretrained: bool = True, device: str | torch.device | None = None, **timm_kwargs
) -> Backbone:
    """Load a frozen backbone.

    Args:
        name: A zoo name ("tiny-mae", "tiny-sup", "tiny-random"), a timm model name
            with an optional pretrained tag ("vit_base_patch16_224.mae"), a preset of
            :mod:`epviz.presets` ("mae-vit-b"), or any of these but the zoo's followed by
            ":random" for seeded random weights ("test_vit:random").
        weights: A local .safetensors or torch checkpoint to load instead of hub weights. Its
            keys and shapes must fit the architecture exactly, its tensors must be dense (no
            stride-0 expansions) and its values finite; a torch checkpoint may hold tensors only (no
            pickled objects) and its zip records may not be compressed (see :mod:`epviz.safe_load`).
        pretrained: Load pretrained hub weights (ignored with `weights`); False gives a
            randomly initialised timm model (architecture checks, tests).
        device: Where the model lives; None picks CUDA when present, else CPU.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. img_size).

    Raises:
        BackboneError: Unknown name (with close matches), missing or unreadable weights file, a
            checkpoint holding pickled objects or compressed records, weights that do not fit the
            architecture, are not dense or hold NaN/inf, or torch failing (out of memory) while loading them.
        HubUnavailable: Hub weights requested, not cached, hub not reachable.
        ConfigError: `name` is not a string.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a backbone name such as 'tiny-mae' or 'vit_base_patch16_224.mae', got {name!r}")
    if presets.handles(name):  # paper presets ("mae-vit-b") and random-init names ("test_vit:random")
        return _load_preset(name, weights=weights, pretrained=pretrained, device=device, **timm_kwargs)
    dev = resolve_device(device)
    if name in zoo.ZOO:
        if weights is not None:
            raise BackboneError(f"{name} is a zoo backbone with its own weights; pass weights= only with a timm name")
        return _move(_load_zoo(name), dev)
    _check_name(name)
    if weights is not None:
        path = Path(weights)
        state = _read_weights(path)
        with torch_errors(path, f"building {name} for its weights", error=BackboneError):
            model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in expected}
        check_weights_fit(
            state,
            expected,
            path,
            name,
            error=BackboneError,
            fix=(
                "Load the file with the architecture it was trained with (the timm name of that width, patch size and "
                "depth, and its img_size); epviz does not resample or drop weights."
            ),
        )
        check_weights(state, path, error=BackboneError)
        with torch_errors(path, f"loading its weights into {name}", error=BackboneError):
            model.load_state_dict(state, strict=True)
        backbone = _describe_model(model, name, zoo.file_sha256(path), {"weights": str(path)})
        with torch_errors(path, f"placing {name} on {dev}", error=BackboneError):
            return _move(backbone, dev)
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        return _move(_describe_model(model, name, f"{name}-random-seed0", {"pretrained": False}), dev)
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    cfg = pcfg.to_dict() if pcfg is not None else {}
    cached = _cached_hub_file(cfg)
    if cached is None:
        host = os.environ.get(HUB_HOST_ENV, "huggingface.co")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable(host):
            why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
            raise HubUnavailable(
                f"pretrained weights of {name} ({cfg.get('hf_hub_id') or 'no hub id'}) are not in the local cache and {why}. "
                f"Either download them once on a connected machine (timm.create_model({name!r}, pretrained=True)), "
                f"or pass a local file: load_backbone({name!r}, weights='path/to/weights.safetensors')"
            )
        model = timm.create_model(name, pretrained=True, num_classes=0, **timm_kwargs)
        cached = _cached_hub_file(cfg) or ""
    else:
        with torch_errors(cached, f"loading the cached hub weights of {name}", error=BackboneError):
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": cached}, **timm_kwargs
            )
    weights_id = zoo.file_sha256(Path(cached)) if cached else _state_hash(model)
    return _move(
        _describe_model(
            model,
            name,
            weights_id,
            {"pretrained_cfg": {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, tuple, list))}},
        ),
        dev,
    )


def _load_preset(name: str, weights=None, pretrained: bool = True, device=None, **timm_kwargs) -> Backbone:
    """A preset or ``:random`` backbone, loaded as its timm name; the Backbone keeps `name`."""
    base, random = presets.split_random(name)
    if random and base in zoo.ZOO:
        raise BackboneError(f"{name!r}: zoo backbones have fixed weights; the zoo's random-init control is 'tiny-random'")
    try:
        timm_name, pretrained, kwargs, card = presets.resolve(name, weights, pretrained, timm_kwargs)
    except ValueError as err:
        raise BackboneError(str(err)) from None
    backbone = load_backbone(timm_name, weights=weights, pretrained=pretrained, device=device, **kwargs)
    backbone.name = name
    backbone.card.update(card)
    return backbone


def present_backbones(names: Iterable[str]) -> list[str]:
    """The backbones of `names` that can be loaded now: zoo models whose weights file and model
    card exist (``tiny-random`` always), and every non-zoo name (timm models are checked when loaded).

    A zoo backbone without weights is left out with a warning.
    """
    out, loadable = [], zoo.available()
    for name in names:
        if name in zoo.ZOO and name not in loadable:
            where = zoo.zoo_weights(name).with_suffix(".*")
            warnings.warn(
                f"{name} is left out: its weights or model card ({where}) are missing (make zoo makes them)", stacklevel=2
            )
            continue
        out.append(name)
    return out


def _move(backbone: Backbone, device: torch.device) -> Backbone:
    backbone.model.to(device)
    return backbone
