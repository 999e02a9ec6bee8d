"""epviz: attentive probing of frozen Vision Transformers, with the attention maps in view.

The public API, re-exported here::

    backbone = epviz.load_backbone("tiny-mae")
    cache = epviz.extract_tokens(backbone, dataset, layers=[-1])
    probe = epviz.probes.build("ep16", backbone.dim, num_classes)
    result = epviz.fit(probe, cache.tokens(-1), val_tokens)
"""

from typing import TYPE_CHECKING

from epviz import analysis, data, probes, viz
from epviz._version import __version__
from epviz.backbones import Backbone, load_backbone, presets
from epviz.evaluate import accuracy, attention_maps, collect_attention, predict
from epviz.runtime import resolve_device
from epviz.setting import Setting
from epviz.study import Study, open_study
from epviz.tokens import TokenBatch, TokenCache, TokenSet, extract_tokens
from epviz.training import FitResult, fit, fit_images, load_probe, save_probe

if TYPE_CHECKING:
    from epviz.explorer import Explorer


def __getattr__(name: str) -> "type[Explorer]":
    """``epviz.Explorer`` is imported on first use, so ``import epviz`` does not load the widget stack."""
    if name == "Explorer":
        from epviz.explorer import Explorer

        return Explorer
    raise AttributeError(f"module 'epviz' has no attribute {name!r}")


__all__ = [
    "Backbone",
    "Explorer",
    "FitResult",
    "Setting",
    "Study",
    "TokenBatch",
    "TokenCache",
    "TokenSet",
    "__version__",
    "accuracy",
    "analysis",
    "attention_maps",
    "collect_attention",
    "data",
    "extract_tokens",
    "fit",
    "fit_images",
    "load_backbone",
    "load_probe",
    "open_study",
    "predict",
    "presets",
    "probes",
    "resolve_device",
    "save_probe",
    "viz",
]
