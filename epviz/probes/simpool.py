"""SimPool and its projection-free variant: the GAP vector is the query.

As in the reference code, SimPool's query is W_Q applied to the mean of the raw
tokens; keys are W_K LN(x) and values LN(x) (no value projection). The efficient
variant drops W_Q and W_K: query LN(mean x), keys LN(x), values x. Values are not
projected, so head h alone produces columns [h*D/H, (h+1)*D/H) of the pooled feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import head_slices, merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["SimPoolProbe", "EfficientSimPoolProbe"]


@register("simpool")
class SimPoolProbe(MultiHeadProbe):
    """SimPool: one GAP query, W_Q and W_K without biases, a shared LayerNorm.

    Args:
        heads: Attention heads (default 1).
    """

    sliced = True

    preferred_heads = 1

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.token_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.wq = nn.Linear(self.dim, self.dim, bias=False)
        self.wk = nn.Linear(self.dim, self.dim, bias=False)
        self._finish(self.dim)

    def predictor_slices(self) -> list[slice | None]:
        return head_slices(self.width, self.heads)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        x = self.token_norm(patch)
        q = split_heads(self.wq(patch.mean(dim=1, keepdim=True)), self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, split_heads(self.wk(x), self.heads)), uniform)
        return Pooled(merge_heads(attn, split_heads(x, self.heads)), maps)


@register("esimpool")
class EfficientSimPoolProbe(MultiHeadProbe):
    """SimPool without linear layers: query LN(GAP), keys LN(x), values x.

    Args:
        heads: Attention heads (default 12).
    """

    sliced = True

    preferred_heads = 12

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.token_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self._finish(self.dim)

    def predictor_slices(self) -> list[slice | None]:
        return head_slices(self.width, self.heads)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.token_norm(patch.mean(dim=1, keepdim=True)), self.heads)
        k = split_heads(self.token_norm(patch), self.heads)
        attn, maps, _ = self._route_attention(query_weights(q, k), uniform)
        return Pooled(merge_heads(attn, split_heads(patch, self.heads)), maps)
