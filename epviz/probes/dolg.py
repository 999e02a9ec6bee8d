"""DOLG's local branch: a positive spatial map weights L2-normalised per-position features.

The map w is not a softmax; :meth:`~epviz.probes.Probe._route_attention` hands
``hook_attn`` the normalised map w / sum(w) and continues with its output times
sum(w), so the hook stays in the computation path. "Uniform" replaces w by its mean.
1x1 convolutions are per-token linear layers (identical parameters and output).

Initialisation as in the reference implementation (its ResNet-style ``init_weights`` applied
to both 1x1 convolutions): weights drawn from N(0, 2 / fan_out), fan_out = output channels,
so conv1 (D -> D) has std sqrt(2 / D) and conv2 (D -> 1) std sqrt(2); their biases keep
PyTorch's default U(-1/sqrt(D), 1/sqrt(D)) (the reference does not reset them), the BatchNorm
is weight 1, bias 0. With PyTorch's default for conv2 (68x smaller at D = 768) the map at
initialisation is uniform (normalised entropy 1.00); with the reference's it is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epviz.probes._base import Pooled, Probe
from epviz.probes._registry import register

__all__ = ["DolgProbe"]


@register("dolg")
class DolgProbe(Probe):
    """DOLG's local branch: f = L2norm(BN(conv1x1(x))); w = softplus(conv1x1(ReLU(BN(conv1x1(x)))));
    pooled = mean over positions of w * f.

    No spatial grid is needed (every operation is per position).
    """

    attentive = True

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid)
        self.conv1 = nn.Linear(self.dim, self.dim)
        self.bn = nn.BatchNorm1d(self.dim, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Linear(self.dim, 1)
        for conv in (self.conv1, self.conv2):  # the reference: N(0, 2 / fan_out), biases left as they are
            nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(2.0 / conv.out_features))
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return 1

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        h = self.bn(self.conv1(patch).transpose(1, 2)).transpose(1, 2)  # (B, N, D)
        features = F.normalize(h, p=2, dim=-1)
        weights, maps, _ = self._route_attention(F.softplus(self.conv2(F.relu(h))).squeeze(-1), uniform)  # (B, N)
        return Pooled((weights.unsqueeze(-1) * features).mean(dim=1), maps)
