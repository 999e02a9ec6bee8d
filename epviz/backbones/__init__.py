"""Frozen backbones: any timm ViT (hub or local weights), the paper's encoders as presets, the embedded zoo.

* :func:`load_backbone` returns a :class:`Backbone` that knows its prefix tokens, grid, width,
  depth, input normalisation and a hash of its weights.
* :mod:`epviz.backbones.presets`: the paper's encoders by short name, as data.
* :mod:`epviz.backbones.zoo`: the embedded tiny backbones (weights and model cards).
"""

from epviz.backbones import presets, zoo
from epviz.backbones.loader import (
    Backbone,
    BackboneError,
    HubUnavailable,
    available_backbones,
    load_backbone,
    present_backbones,
)

__all__ = [
    "Backbone",
    "BackboneError",
    "HubUnavailable",
    "available_backbones",
    "load_backbone",
    "present_backbones",
    "presets",
    "zoo",
]
