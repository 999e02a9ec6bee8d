"""V-JEPA's attentive pooler (depth 1): cross-attention of one learned query, then an MLP.

Attention weights are computed explicitly rather than with fused kernels, because the
probe must return them and must be able to replace a head's weights by the uniform one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import Mlp
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["JepaProbe"]


@register("jepa")
class JepaProbe(MultiHeadProbe):
    """V-JEPA's attentive pooler (depth 1).

    h = q + W_O MHCA(q, LN(x)); pooled = h + MLP(LN(h)); W_Q and W_KV with biases,
    MLP ratio 4. Initialisation as in V-JEPA: truncated normal (std 0.02) weights, zero
    biases, output projections scaled by 1/sqrt(2).

    Args:
        heads: Attention heads (default 16).
        mlp_ratio: Hidden width of the MLP over D.
    """

    preferred_heads = 16

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid, mlp_ratio=float(mlp_ratio))
        self.query = nn.Parameter(torch.zeros(1, self.dim))
        self.norm1 = nn.LayerNorm(self.dim)
        self.q = nn.Linear(self.dim, self.dim)
        self.kv = nn.Linear(self.dim, 2 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp = Mlp(self.dim, int(self.dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)
        for layer in (self.q, self.kv, self.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            assert layer.bias is not None  # every layer here is built with a bias
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp.fc2.weight.div_(math.sqrt(2.0))
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        k, v = self.kv(self.norm1(patch)).chunk(2, dim=-1)
        q = split_heads(self.q(self.query)[None], self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, split_heads(k, self.heads)), uniform)
        h = self.query + self.proj(merge_heads(attn, split_heads(v, self.heads)))
        return Pooled(h + self.mlp(self.norm2(h)), maps)
