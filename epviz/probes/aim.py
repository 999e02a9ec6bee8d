"""AIM's attention-pooling classifier: one learned query over batch-normalised tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import head_slices, merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["AimProbe"]


@register("aim")
class AimProbe(MultiHeadProbe):
    """AIM's attention-pooling classifier.

    Tokens pass a non-affine BatchNorm; one learned query (no W_Q) attends with W_K,
    W_V (no biases) and no output projection, so head h alone produces columns
    [h*D/H, (h+1)*D/H) of the pooled feature.

    Args:
        heads: Attention heads (default 16).
    """

    sliced = True

    preferred_heads = 16

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.token_norm = nn.BatchNorm1d(self.dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.k = nn.Linear(self.dim, self.dim, bias=False)
        self.v = nn.Linear(self.dim, self.dim, bias=False)
        self._finish(self.dim)

    def predictor_slices(self) -> list[slice | None]:
        return head_slices(self.width, self.heads)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        x = self.token_norm(patch.transpose(1, 2)).transpose(1, 2)
        q = split_heads(self.query[None], self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, split_heads(self.k(x), self.heads)), uniform)
        return Pooled(merge_heads(attn, split_heads(self.v(x), self.heads)), maps)
