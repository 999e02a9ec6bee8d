"""One CaiT class-attention block: a class query attends to itself and the patch tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["CaitProbe"]


@register("cait")
class CaitProbe(MultiHeadProbe):
    """One CaiT class-attention block, then a LayerNorm.

    u = LN(concat(c, x)); c' = c + g1 * W_O CA(c, u); c'' = c' + g2 * MLP(LN(c'));
    pooled = LN(c''). The class query attends to itself and the N patch tokens; its
    maps are the patch part, renormalised, and "uniform" is over all N + 1 keys.
    LayerScale g1, g2 start at 1e-5.

    Args:
        heads: Attention heads (default 4).
        init_scale: Initial LayerScale value.
    """

    preferred_heads = 4

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        init_scale: float = 1e-5,
        grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid, init_scale=float(init_scale))
        self.query = nn.Parameter(torch.zeros(1, 1, self.dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm1 = nn.LayerNorm(self.dim, eps=1e-6)
        self.q = nn.Linear(self.dim, self.dim)
        self.k = nn.Linear(self.dim, self.dim)
        self.v = nn.Linear(self.dim, self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.gamma1 = nn.Parameter(torch.full((self.dim,), float(init_scale)))
        self.norm2 = nn.LayerNorm(self.dim, eps=1e-6)
        self.mlp = Mlp(self.dim, 4 * self.dim)
        self.gamma2 = nn.Parameter(torch.full((self.dim,), float(init_scale)))
        self.final_norm = nn.LayerNorm(self.dim)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        c = self.query.expand(len(patch), -1, -1)
        u = self.norm1(torch.cat([c, patch], dim=1))
        q = split_heads(self.q(u[:, :1]), self.heads)
        k, v = split_heads(self.k(u), self.heads), split_heads(self.v(u), self.heads)
        attn, maps, nonpatch = self._route_attention(query_weights(q, k), uniform, num_patch=patch.shape[1], extra_first=True)
        c = c[:, 0] + self.gamma1 * self.proj(merge_heads(attn, v))
        c = c + self.gamma2 * self.mlp(self.norm2(c))
        return Pooled(self.final_norm(c), maps, nonpatch)
