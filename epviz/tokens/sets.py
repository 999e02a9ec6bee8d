"""Tokens of several backbones and splits at once: every block extracted once, then cache hits.

The notebooks extract each backbone's tokens for every split and *every* block in one pass, so
that the layer sweep and the last-block analyses share one extraction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from epviz.backbones import Backbone, load_backbone
from epviz.tokens.cache import TokenCache, extract_tokens
from epviz.tokens.tokenset import TokenSet

__all__ = ["extract_sets", "layer_tokens"]


def _as_backbone(backbone: str | Backbone) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else load_backbone(backbone)


def extract_sets(
    backbones: Iterable[str | Backbone],
    sets: Mapping[str, object],
    *,
    batch_size: int = 256,
    progress: bool = False,
    **extract_options: Any,
) -> dict[str, dict[str, TokenCache]]:
    """Token caches per backbone and split (extracted once, then cache hits), every block by default.

    Args:
        backbones: Backbone names (or loaded backbones).
        sets: The datasets per split, e.g. ``{"train": ..., "val": ..., "test": ...}``.
        batch_size: Images per backbone pass.
        progress: Show extraction progress bars.
        **extract_options: More :func:`epviz.extract_tokens` options: ``layers`` (default None: every
            block), ``dtype``, ``precision``, ``norm``, ``views`` (train split only), ``cache_dir``, ...
            At ImageNet scale store only the layers you read: one float16 layer of ImageNet-1k
            train at ViT-B/16 is 388 GB.

    Returns:
        ``{backbone name: {split: TokenCache}}``.
    """
    if not sets:
        raise ValueError("no datasets given: pass sets={'train': ..., 'val': ..., 'test': ...}")
    out: dict[str, dict[str, TokenCache]] = {}
    for backbone in backbones:
        bb = _as_backbone(backbone)
        options = {"layers": None, **extract_options}
        views = options.pop("views", 1)
        out[bb.name] = {
            split: extract_tokens(
                bb, dataset, batch_size=batch_size, progress=progress, views=views if split == "train" else 1, **options
            )
            for split, dataset in sets.items()
        }
    return out


def layer_tokens(
    caches: Mapping[str, Mapping[str, TokenCache]],
    layer: int = -1,
    *,
    in_memory: bool = True,
) -> dict[str, dict[str, TokenSet]]:
    """The tokens of one block per backbone and split, read from the all-block caches of :func:`extract_sets`.

    Args:
        caches: ``{backbone: {split: TokenCache}}``.
        layer: Block index (0 = first, -1 = last).
        in_memory: Load the tokens into RAM (else memory maps).

    Returns:
        ``{backbone name: {split: TokenSet}}``.
    """
    return {
        name: {split: cache.tokens(layer, in_memory=in_memory) for split, cache in per_split.items()}
        for name, per_split in caches.items()
    }
