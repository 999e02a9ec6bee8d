"""Tokens: one backbone pass over a dataset into an on-disk cache, and the per-layer view probes read.

* :func:`extract_tokens` / :class:`TokenCache`: extraction of every requested block, atomic, keyed.
* :class:`TokenSet` / :class:`TokenBatch`: the tokens of one layer, batched for probes.
* :func:`extract_sets` / :func:`layer_tokens`: the same for several backbones and splits at once.
"""

from epviz.tokens.cache import CACHE_FORMAT, TokenCache, cache_key, default_cache_dir, extract_tokens
from epviz.tokens.quantized import Int8Tokens, dequantize, quantize
from epviz.tokens.sets import extract_sets, layer_tokens
from epviz.tokens.tokenset import TokenArray, TokenBatch, TokenOrigin, TokenSet
from epviz.tokens.views import VIEW_PROTOCOL, ViewParams, apply_view, augmented_batch, view_generator, view_params

__all__ = [
    "CACHE_FORMAT",
    "VIEW_PROTOCOL",
    "Int8Tokens",
    "TokenArray",
    "TokenBatch",
    "TokenCache",
    "TokenOrigin",
    "TokenSet",
    "ViewParams",
    "apply_view",
    "augmented_batch",
    "cache_key",
    "default_cache_dir",
    "dequantize",
    "extract_sets",
    "extract_tokens",
    "layer_tokens",
    "quantize",
    "view_generator",
    "view_params",
]
