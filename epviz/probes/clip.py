"""CLIP's AttentionPool2d over ViT tokens: the GAP token attends to itself and the patch tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["ClipProbe"]


@register("clip")
class ClipProbe(MultiHeadProbe):
    """CLIP's AttentionPool2d over ViT tokens.

    x = LN(tokens); prepend their mean (the GAP token); add a learned positional
    embedding of N + 1 rows; multi-head self-attention with W_QKV and W_O (biases);
    the output is token 0. Only token 0's query is computed, which gives the same
    output as the full self-attention. Head h's map is token 0's row over the patch
    keys, renormalised; "uniform" is over all N + 1 keys (the GAP token included).

    The positional embedding fixes N at build: from ``num_tokens``, else from
    ``grid``, else the default 14x14 grid (196 tokens).

    Args:
        heads: Attention heads (default 4).
        num_tokens: Number N of patch tokens the probe will see.
    """

    preferred_heads = 4

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        num_tokens: int | None = None,
        grid: Sequence[int] | None = None,
    ) -> None:
        if num_tokens is None:
            num_tokens = 196 if grid is None else int(grid[0]) * int(grid[1])
        num_tokens = int(num_tokens)
        if grid is not None and int(grid[0]) * int(grid[1]) != num_tokens:
            raise ValueError(
                f"probe 'clip': grid {tuple(grid)} has {int(grid[0]) * int(grid[1])} cells but num_tokens={num_tokens}"
            )
        super().__init__(dim, num_classes, heads=heads, grid=grid, num_tokens=num_tokens)
        self.num_tokens = num_tokens
        self.token_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens + 1, self.dim))
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        nn.init.trunc_normal_(self.pos_embed, std=self.dim**-0.5)
        nn.init.trunc_normal_(self.qkv.weight, std=self.dim**-0.5)
        nn.init.zeros_(self.qkv.bias)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        if n != self.num_tokens:
            raise ValueError(
                f"probe 'clip' was built for {self.num_tokens} patch tokens (its positional embedding has "
                f"{self.num_tokens} + 1 rows) but got {n}; build it with num_tokens={n} or grid=(rows, cols)"
            )
        x = self.token_norm(patch)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)
        w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
        b_q, b_kv = self.qkv.bias.split([self.dim, 2 * self.dim])
        q = split_heads(nn.functional.linear(x[:, :1], w_q, b_q), self.heads)
        k, v = nn.functional.linear(x, w_kv, b_kv).chunk(2, dim=-1)
        attn, maps, nonpatch = self._route_attention(
            query_weights(q, split_heads(k, self.heads)), uniform, num_patch=n, extra_first=True
        )
        return Pooled(self.proj(merge_heads(attn, split_heads(v, self.heads))), maps, nonpatch)
