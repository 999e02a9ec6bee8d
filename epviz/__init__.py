"""epviz: attentive probing of frozen Vision Transformers, with the attention maps in view.

The public API, re-exported here::

    backbone = epviz.load_backbone("tiny-mae")
    cache = epviz.extract_tokens(backbone, dataset, layers=[-1])
    probe = epviz.probes.build("ep", backbone.dim, num_classes, num_queries=16)
    result = epviz.fit(probe, cache.tokens(-1), val_tokens)
"""

from epviz import analysis, data, plots, presets, probes
from epviz.backbones import Backbone, load_backbone
from epviz.evaluate import accuracy, attention_maps, collect_attention, predict
from epviz.runtime import resolve_device
from epviz.tokens import TokenCache, extract_tokens
from epviz.tokenset import TokenBatch, TokenSet
from epviz.train import FitResult, fit, load_probe, save_probe
from epviz.train_images import fit_images

__version__ = "0.1.0"


def __getattr__(name: str):
    """``epviz.Explorer`` is imported on first use, so ``import epviz`` does not load the widget stack."""
    if name == "Explorer":
        from epviz.explorer import Explorer

        return Explorer
    raise AttributeError(f"module 'epviz' has no attribute {name!r}")


__all__ = [
    "Backbone", "Explorer", "FitResult", "analysis", "TokenBatch", "TokenCache", "TokenSet", "accuracy", "attention_maps",
    "collect_attention", "data", "extract_tokens", "fit", "fit_images", "load_backbone", "load_probe", "plots",
    "predict", "presets", "probes", "resolve_device", "save_probe",
]
