"""Attention-based multiple-instance learning pooling (AbMILP) with self-attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epviz.probes._base import Pooled, Probe
from epviz.probes._registry import register

__all__ = ["AbmilpProbe"]


@register("abmilp")
class AbmilpProbe(Probe):
    """AbMILP: one-head self-attention over the tokens, then a Linear-tanh-Linear scorer.

    s = SA(x) (W_QKV without bias, W_O with bias); a = softmax_over_tokens(scorer(s));
    pooled = sum_n a_n s_n. The single predictor is a; "uniform" sets it to 1/N.
    """

    attentive = True

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid)
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=False)
        self.proj = nn.Linear(self.dim, self.dim)
        self.scorer = nn.Sequential(nn.Linear(self.dim, self.dim), nn.Tanh(), nn.Linear(self.dim, 1))
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return 1

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        q, k, v = self.qkv(patch).view(b, n, 3, 1, self.dim).permute(2, 0, 3, 1, 4).unbind(0)
        s = self.proj(F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B, N, D)
        weights, maps, _ = self._route_attention(self.scorer(s).transpose(1, 2).softmax(dim=-1), uniform)  # (B, 1, N)
        return Pooled((weights @ s).squeeze(1), maps)
