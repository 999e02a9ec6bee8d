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
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from epviz.backbones import presets, zoo
from epviz.errors import WeightsError
from epviz.runtime import resolve_device

__all__ = ["Backbone", "load_backbone", "BackboneError", "HubUnavailable", "available_backbones", "present_backbones"]

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
            ValueError: An index is out of range or not an integer.
        """
        if layers is None:
            return list(range(self.depth))
        if isinstance(layers, (int,)) and not isinstance(layers, bool):
            layers = [layers]
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"layer indices must be integers, got {layer!r}")
            if not -self.depth <= layer < self.depth:
                raise ValueError(
                    f"layer {layer} is out of range for {self.name}, which has {self.depth} blocks: "
                    f"use 0..{self.depth - 1} (0 is the first block) or -1..-{self.depth} (-1 is the last)"
                )
            out.append(layer % self.depth)
        if len(set(out)) != len(out):
            raise ValueError(f"layers {list(layers)} name the same block twice")
        return out

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
            raise ValueError(f"the dataset yields {kind} images (shape {tuple(images.shape)}); the backbone needs RGB: "
                             "convert them (e.g. PIL .convert('RGB')) in the dataset")
        images = images.to(device)
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (images - mean) / std

    def describe(self) -> dict:
        """A JSON-able summary (used in reports and cache keys)."""
        return {
            "name": self.name, "weights_id": self.weights_id, "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid), "dim": self.dim, "depth": self.depth, "image_size": list(self.image_size),
            "mean": list(self.mean), "std": list(self.std),
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
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    img = tuple(int(s) for s in model.patch_embed.img_size)
    blocks = getattr(model, "blocks", None)
    depth = len(blocks) if blocks is not None else len(model.stages)
    return Backbone(
        model=_freeze(model), name=name, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        grid=(grid[0], grid[1]), dim=int(model.embed_dim), depth=int(depth), image_size=(img[0], img[1]),
        mean=tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(std or cfg.get("std", (0.229, 0.224, 0.225))),
        weights_id=weights_id, card=card,
    )


def _load_zoo(name: str) -> Backbone:
    from safetensors.torch import load_file

    card = zoo.zoo_card(name)
    model = zoo.build_zoo_vit()
    if name == "tiny-random":
        model.load_state_dict(zoo.random_state_dict())
        weights_id = f"tiny-random-seed{zoo.RANDOM_SEED}"
    else:
        path = zoo.zoo_weights(name)
        if not path.is_file():
            raise BackboneError(f"the weights of {name} ({path}) are missing; reinstall epviz or run scripts/train_zoo.py")
        weights_id = zoo.file_sha256(path)
        if card.get("sha256") and card["sha256"] != weights_id:
            raise BackboneError(f"{path} does not match the sha256 in its model card; the file is corrupt — reinstall epviz")
        model.load_state_dict(load_file(str(path)))
    norm = card.get("normalization", zoo.NORMALIZATION)
    return _describe_model(model, name, weights_id, card, mean=norm["mean"], std=norm["std"])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch checkpoint, never unpickling arbitrary objects."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise BackboneError(
            f"cannot read weights from {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            "epviz reads .safetensors files and torch checkpoints of plain tensors (weights_only=True)"
        ) from err
    for key in ("model", "state_dict", "module", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
    raise BackboneError(f"unknown backbone {name!r}.{hint} Zoo backbones: {', '.join(zoo.ZOO)}; any timm ViT name works (timm.list_models('vit*')).")


def load_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True, device: str | torch.device | None = None, **timm_kwargs) -> Backbone:
    """Load a frozen backbone.

    Args:
        name: A zoo name ("tiny-mae", "tiny-sup", "tiny-random"), a timm model name
            with an optional pretrained tag ("vit_base_patch16_224.mae"), a preset of
            :mod:`epviz.presets` ("mae-vit-b"), or any of these but the zoo's followed by
            ":random" for seeded random weights ("test_vit:random").
        weights: A local .safetensors or torch checkpoint to load instead of hub weights.
        pretrained: Load pretrained hub weights (ignored with `weights`); False gives a
            randomly initialised timm model (architecture checks, tests).
        device: Where the model lives; None picks CUDA when present, else CPU.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. img_size).

    Raises:
        BackboneError: Unknown name (with close matches), missing or unreadable weights file.
        HubUnavailable: Hub weights requested, not cached, hub not reachable.
    """
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
        model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"{path} does not fit {name}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Check the architecture name"
            )
        return _move(_describe_model(model, name, zoo.file_sha256(path), {"weights": str(path)}), dev)
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
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": cached}, **timm_kwargs)
    weights_id = zoo.file_sha256(Path(cached)) if cached else _state_hash(model)
    return _move(_describe_model(model, name, weights_id, {"pretrained_cfg": {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, tuple, list))}}), dev)


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
    out = []
    for name in names:
        if name in zoo.ZOO and name != "tiny-random":
            files = (zoo.zoo_weights(name), zoo.zoo_weights(name).with_suffix(".json"))
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                warnings.warn(f"{name} is left out: {', '.join(missing)} missing (scripts/train_zoo.py makes them)", stacklevel=2)
                continue
        out.append(name)
    return out


def _move(backbone: Backbone, device: torch.device) -> Backbone:
    backbone.model.to(device)
    return backbone
