"""Multi-head cross-attention (MHCA) of one learned query over the patch tokens.

Each head is one attention predictor: its query's distribution over the patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["MultiHeadCrossAttentionProbe"]


@register("mhca")
class MultiHeadCrossAttentionProbe(MultiHeadProbe):
    """Multi-head cross-attention of one learned query over the tokens.

    y = W_O concat_h softmax((q W_Q^h)(X W_K^h)^T / sqrt(d)) X W_V^h, which equals
    ``torch.nn.MultiheadAttention`` with the same weights. The projections have no
    biases by default (``bias=False``), which gives the reference count of 4 D^2 + D
    pooling parameters; ``bias=True`` adds 4 D.

    Args:
        heads: Attention heads; default D // 64 (12 at D=768).
        bias: Whether W_Q, W_K, W_V, W_O have biases.
    """

    @classmethod
    def default_heads(cls, dim: int) -> int:
        return max(1, dim // 64)  # the reference: heads of width 64

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        bias: bool = False,
        grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid, bias=bool(bias))
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.q_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.k_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.v_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.out_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.q_proj(self.query)[None], self.heads)  # (1, H, 1, d)
        k = split_heads(self.k_proj(patch), self.heads)
        v = split_heads(self.v_proj(patch), self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, k), uniform)  # (B, H, N)
        return Pooled(self.out_proj(merge_heads(attn, v)), maps)

    def _token_values(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's weights, and each token's value through head h's block of W_O (W_O's bias shared 1/H per head)."""
        q = split_heads(self.q_proj(self.query)[None], self.heads)
        weights = self._route_attention(query_weights(q, split_heads(self.k_proj(patch), self.heads)), frozenset()).weights
        v = split_heads(self.v_proj(patch), self.heads)  # (B, H, N, d)
        w_out = self.out_proj.weight.view(self.dim, self.heads, -1)  # (D, H, d)
        values = torch.einsum("bhnd,ehd->bhne", v, w_out)
        if self.out_proj.bias is not None:
            values = values + self.out_proj.bias / self.heads
        return weights, values
