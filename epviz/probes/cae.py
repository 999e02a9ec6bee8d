"""CAE's attentive block: a learned query cross-attends with LayerNorm on the q, k, v inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["CaeProbe"]


@register("cae")
class CaeProbe(MultiHeadProbe):
    """CAE's attentive block: a learned query cross-attends with LayerNorm on the q, k, v inputs.

    W_Q, W_K, W_V have no bias; W_O has one. The reference module also holds a fourth
    LayerNorm that its forward never uses; it is kept here as ``unused_norm`` only so
    the parameter count matches the reference (2 D of the 4 D^2 + 10 D). The query is
    initialised N(0, 0.02^2) (the reference starts it at zero).

    Args:
        heads: Attention heads (default 8).
    """

    preferred_heads = 8

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.norm_q = nn.LayerNorm(self.dim)
        self.norm_k = nn.LayerNorm(self.dim)
        self.norm_v = nn.LayerNorm(self.dim)
        self.unused_norm = nn.LayerNorm(self.dim)
        self.q = nn.Linear(self.dim, self.dim, bias=False)
        self.k = nn.Linear(self.dim, self.dim, bias=False)
        self.v = nn.Linear(self.dim, self.dim, bias=False)
        self.proj = nn.Linear(self.dim, self.dim)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.q(self.norm_q(self.query))[None], self.heads)
        k = split_heads(self.k(self.norm_k(patch)), self.heads)
        v = split_heads(self.v(self.norm_v(patch)), self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, k), uniform)
        return Pooled(self.proj(merge_heads(attn, v)), maps)
