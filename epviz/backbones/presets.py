"""Backbone presets: the paper's encoders by short name, mapped to timm.

``load_backbone("mae-vit-b")`` resolves the preset to its timm model (here
``vit_base_patch16_224.mae``) and loads it like any timm name (hub cache, offline
error, ``weights=PATH``). Every preset runs at 224 px input, the crop of the reference
evaluation transform (Resize 256 + CenterCrop 224); models whose timm default differs
(DINOv2: 518, SigLIP-L: 256) get ``img_size=224`` and timm resamples their position
embeddings. Input mean/std come from timm's pretrained config of the model, never from
this table.

Layer convention (all presets): blocks are numbered 0 .. depth - 1 and -1 is the last.

Final norm (``Preset.final_norm``), the reference implementation's convention per family:
its own ViT path (``models_vit``, used for MAE, BEiTv2 and DINO) reads the chosen block's raw
output, *without* the encoder's final norm; its DINOv2 wrapper (``get_intermediate_layers``,
norm on) and its timm / open_clip wrappers (``forward_features``: CLIP, EVA02, SigLIP) apply
it. :func:`epviz.extract_tokens` follows the preset by default (``norm=None``) and applies
the norm to every extracted block; ``norm=True`` / ``norm=False`` overrides. Plain timm names
and the zoo backbones default to no final norm. timm's EVA02 keeps an identity ``norm`` (its
LayerNorm, ``fc_norm``, comes after pooling), so its tokens are the same either way.

``ep_all`` is the default EP variant for encoders whose training objective is defined on
[CLS] (DINO, DINOv2, CLIP); plain ``ep`` for masked-image-modelling encoders (MAE,
BEiTv2, EVA02) and for SigLIP, which has no [CLS] token.

Random initialisation: any timm name or preset followed by ``:random`` (``"test_vit:random"``,
``"mae-vit-b:random"``) builds the architecture with seeded random weights and no
download, with a warning: such a backbone checks a pipeline, it measures nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Preset",
    "PRESETS",
    "RANDOM_SUFFIX",
    "get_preset",
    "available_presets",
    "split_random",
    "default_probe",
    "default_norm",
    "preset_architecture",
    "handles",
    "resolve",
]

RANDOM_SUFFIX = ":random"
IMG_SIZE = 224


@dataclass(frozen=True)
class Preset:
    """One encoder of the paper.

    Attributes:
        name: Short name ("mae-vit-b").
        timm_name: timm architecture with its pretrained tag.
        objective: What the encoder was trained for (one line).
        ep_all: Whether EP should read [CLS] too (``ep_all``) by default.
        timm_kwargs: Extra ``timm.create_model`` arguments (``img_size=224``).
        layer: Default block (-1: the last).
        weights_required: timm has no checkpoint of this exact encoder: pass ``weights=PATH``.
        note: Where the weights come from, caveats.
        cfg_from: Another timm name whose pretrained config gives the input mean/std
            (for presets whose timm architecture carries no config of this encoder).
        final_norm: Whether the reference implementation applies the encoder's final norm
            to the tokens of this encoder (the default of :func:`epviz.extract_tokens`).
    """

    name: str
    timm_name: str
    objective: str
    ep_all: bool
    timm_kwargs: dict = field(default_factory=dict)
    layer: int = -1
    weights_required: bool = False
    note: str = ""
    cfg_from: str | None = None
    final_norm: bool = False

    @property
    def architecture(self) -> str:
        """The timm architecture without the pretrained tag."""
        return self.timm_name.split(".", 1)[0]

    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of the model (mean, std, input size, hub id)."""
        from timm.models import get_pretrained_cfg

        source = self.cfg_from or self.timm_name
        cfg = get_pretrained_cfg(source) if "." in source else None
        if cfg is None:
            cfg = get_pretrained_cfg(self.architecture)
        return cfg.to_dict() if cfg is not None else {}

    @property
    def mean(self) -> tuple[float, float, float]:
        """Input mean from the pretrained config."""
        return tuple(self.pretrained_cfg()["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        """Input std from the pretrained config."""
        return tuple(self.pretrained_cfg()["std"])


_224 = {"img_size": IMG_SIZE}
_MIM = "masked image modelling (no loss on [CLS])"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "mae-vit-s",
            "vit_small_patch16_224",
            f"MAE, {_MIM}",
            False,
            weights_required=True,
            note="timm has no MAE ViT-S checkpoint: pass the MAE ViT-S/16 weights with weights=PATH",
            cfg_from="vit_base_patch16_224.mae",
            final_norm=False,
        ),
        Preset("mae-vit-b", "vit_base_patch16_224.mae", f"MAE, {_MIM}", False, final_norm=False),
        Preset("mae-vit-l", "vit_large_patch16_224.mae", f"MAE, {_MIM}", False, final_norm=False),
        Preset("mae-vit-h", "vit_huge_patch14_224.mae", f"MAE, {_MIM}", False, final_norm=False),
        Preset(
            "beitv2-vit-b",
            "beitv2_base_patch16_224",
            f"BEiTv2, {_MIM} with VQ-KD targets",
            False,
            weights_required=True,
            note="timm only has fine-tuned BEiTv2 weights (beitv2_base_patch16_224.in1k_ft_in1k); probing them is not the "
            "paper's setting: pass the self-supervised checkpoint with weights=PATH",
            cfg_from="vit_base_patch16_224.mae",
            final_norm=False,
        ),
        Preset("dino-vit-s", "vit_small_patch16_224.dino", "DINO self-distillation on [CLS]", True, final_norm=False),
        Preset("dino-vit-b", "vit_base_patch16_224.dino", "DINO self-distillation on [CLS]", True, final_norm=False),
        Preset(
            "dinov2-vit-s",
            "vit_small_patch14_dinov2.lvd142m",
            "DINOv2: [CLS] distillation + iBOT MIM",
            True,
            _224,
            final_norm=True,
        ),
        Preset(
            "dinov2-vit-b",
            "vit_base_patch14_dinov2.lvd142m",
            "DINOv2: [CLS] distillation + iBOT MIM",
            True,
            _224,
            final_norm=True,
        ),
        Preset(
            "dinov2-vit-l",
            "vit_large_patch14_dinov2.lvd142m",
            "DINOv2: [CLS] distillation + iBOT MIM",
            True,
            _224,
            final_norm=True,
        ),
        Preset(
            "dinov2-vit-b-reg", "vit_base_patch14_reg4_dinov2.lvd142m", "DINOv2 with 4 registers", True, _224, final_norm=True
        ),
        Preset(
            "dinov2-vit-l-reg", "vit_large_patch14_reg4_dinov2.lvd142m", "DINOv2 with 4 registers", True, _224, final_norm=True
        ),
        Preset("clip-vit-b", "vit_base_patch16_clip_224.openai", "CLIP image-text contrastive on [CLS]", True, final_norm=True),
        Preset("clip-vit-l", "vit_large_patch14_clip_224.openai", "CLIP image-text contrastive on [CLS]", True, final_norm=True),
        Preset("eva02-vit-b", "eva02_base_patch14_224.mim_in22k", f"EVA02, {_MIM} of CLIP features", False, final_norm=True),
        Preset("eva02-vit-l", "eva02_large_patch14_224.mim_in22k", f"EVA02, {_MIM} of CLIP features", False, final_norm=True),
        Preset(
            "siglip-vit-b",
            "vit_base_patch16_siglip_224.webli",
            "SigLIP image-text sigmoid loss; no [CLS] (attention pool)",
            False,
            note="no [CLS]: LP on [CLS] and ep_all do not apply; use gap / ep",
            final_norm=True,
        ),
        Preset(
            "siglip-vit-l",
            "vit_large_patch16_siglip_256.webli",
            "SigLIP image-text sigmoid loss; no [CLS] (attention pool)",
            False,
            _224,
            note="run at 224 px instead of timm's 256; no [CLS]",
            final_norm=True,
        ),
    )
}


def available_presets() -> list[str]:
    """Names of all presets."""
    return list(PRESETS)


def split_random(name: str) -> tuple[str, bool]:
    """``("x", True)`` for ``"x:random"``, else ``(name, False)``."""
    if isinstance(name, str) and name.endswith(RANDOM_SUFFIX):
        return name[: -len(RANDOM_SUFFIX)], True
    return name, False


def get_preset(name: str) -> Preset | None:
    """The preset called `name` (with or without ``:random``), or None."""
    return PRESETS.get(split_random(name)[0])


def default_probe(name: str) -> str:
    """ "ep_all" for presets trained on [CLS], "ep" otherwise (and for non-presets)."""
    preset = get_preset(name)
    return "ep_all" if preset is not None and preset.ep_all else "ep"


def default_norm(name: str) -> bool:
    """Whether tokens of backbone `name` get the encoder's final norm by default.

    A preset (with or without ``:random``): its ``final_norm``, the reference
    implementation's convention. Anything else (plain timm names, zoo backbones): False.
    """
    preset = get_preset(name)
    return bool(preset.final_norm) if preset is not None else False


def resolve(name: str, weights, pretrained: bool, timm_kwargs: dict) -> tuple[str, bool, dict, dict]:
    """What :func:`epviz.load_backbone` should build for `name`.

    Returns:
        (timm name, pretrained, timm kwargs, facts for the model card).

    Raises:
        ValueError: A preset whose weights timm does not have, asked for without ``weights=``.
    """
    base, random = split_random(name)
    preset = PRESETS.get(base)
    card: dict = {}
    if random:
        if weights is not None:
            raise ValueError(f"{name!r} asks for random weights, so weights= cannot be used with it; drop one of the two")
        warnings.warn(
            f"{name}: the weights are random (seeded initialisation, nothing downloaded); its numbers measure no pretrained model",
            stacklevel=3,
        )
        pretrained = False
        card["random_init"] = True
    if preset is None:
        return base, pretrained, dict(timm_kwargs), card
    if preset.weights_required and pretrained and weights is None:
        raise ValueError(f"{preset.name}: {preset.note}")
    card.update(
        preset=preset.name,
        timm_name=preset.timm_name,
        ep_all=preset.ep_all,
        objective=preset.objective,
        final_norm=preset.final_norm,
    )
    kwargs = {**preset.timm_kwargs, **timm_kwargs}
    if preset.cfg_from:
        kwargs.setdefault("pretrained_cfg_overlay", {"mean": preset.mean, "std": preset.std})
    return preset.timm_name, pretrained, kwargs, card


def preset_architecture(name: str) -> dict:
    """Prefix tokens, grid, width, depth, input size, mean/std and final-norm convention of a preset, built on the meta device.

    No weights are allocated or downloaded: this checks the architecture in a fraction of a
    second even at ViT-L size.
    """
    import timm
    import torch

    preset = get_preset(name)
    if preset is None:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    with torch.device("meta"):
        # a timm ViT: patch_embed, embed_dim are not nn.Module's attributes
        model: Any = timm.create_model(preset.architecture, pretrained=False, num_classes=0, **preset.timm_kwargs)
    blocks = getattr(model, "blocks", None)
    assert blocks is not None  # every preset is a timm ViT, which has blocks
    return {
        "timm_name": preset.timm_name,
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "grid": tuple(int(g) for g in model.patch_embed.grid_size),
        "dim": int(model.embed_dim),
        "depth": len(blocks),
        "image_size": tuple(int(s) for s in model.patch_embed.img_size),
        "mean": preset.mean,
        "std": preset.std,
        "forward_intermediates": hasattr(model, "forward_intermediates"),
        "final_norm": preset.final_norm,
    }


def handles(name: str) -> bool:
    """Whether `name` is a preset or a ``:random`` name (which :func:`load` resolves)."""
    return isinstance(name, str) and (split_random(name)[0] in PRESETS or split_random(name)[1])
