"""Spatial-attention poolers from CNN retrieval / recognition: dolg and cbam.

Their attention is a positive map w over the N positions rather than a softmax. For
the analyses the map is normalised to sum 1 (m = w / sum w); ``hook_attn`` carries m
and the probe continues with m * sum(w), so the hook stays in the computation path.
"Uniform" replaces w by its mean value, i.e. m by 1/N.

Tokens are treated as a feature map in row-major grid order; 1x1 convolutions are
per-token linear layers (identical parameters and output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epviz.probes._base import Pooled, Probe, uniform_rows
from epviz.probes._registry import register

__all__ = ["DolgProbe", "CbamProbe"]


def _normalised_map(probe: Probe, weights: torch.Tensor, uniform: frozenset[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Route a positive map (B, N) through hook_attn as a distribution; return (edited map, distribution)."""
    total = weights.sum(dim=-1, keepdim=True)
    dist = uniform_rows((weights / total).unsqueeze(1), uniform)  # (B, 1, N)
    dist = probe.hook_attn(dist)
    return dist.squeeze(1) * total, dist


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
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return 1

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        h = self.bn(self.conv1(patch).transpose(1, 2)).transpose(1, 2)  # (B, N, D)
        features = F.normalize(h, p=2, dim=-1)
        weights = F.softplus(self.conv2(F.relu(h))).squeeze(-1)  # (B, N)
        weights, dist = _normalised_map(self, weights, uniform)
        return Pooled((weights.unsqueeze(-1) * features).mean(dim=1), dist)


@register("cbam")
class CbamProbe(Probe):
    """CBAM pooling: channel attention, then 7x7 spatial attention, residual, ReLU, GAP.

    Channel gate sigmoid(MLP(avg) + MLP(max)) with a shared bias-free MLP of reduction
    16; spatial gate w = sigmoid(BN(conv7x7([mean_c, max_c]))). The predictor is w. The
    grid comes from ``grid=(rows, cols)`` or, when N is a square, from N.

    Args:
        reduction: Channel reduction ratio of the MLP.
        kernel_size: Spatial convolution size.
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        reduction: int = 16,
        kernel_size: int = 7,
        grid: Sequence[int] | None = None,
    ) -> None:
        if int(kernel_size) % 2 != 1:
            raise ValueError(f"probe 'cbam': kernel_size must be odd, got {kernel_size}")
        super().__init__(dim, num_classes, grid=grid, reduction=int(reduction), kernel_size=int(kernel_size))
        hidden = max(1, int(self.dim / int(reduction) + 0.5))
        self.fc1 = nn.Linear(self.dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, self.dim, bias=False)
        self.conv = nn.Conv2d(2, 1, int(kernel_size), padding=int(kernel_size) // 2, bias=False)
        self.conv_bn = nn.BatchNorm2d(1)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return 1

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        rows, cols = self._grid_for(n)
        mlp = lambda z: self.fc2(F.relu(self.fc1(z)))  # noqa: E731
        x = patch * torch.sigmoid(mlp(patch.mean(dim=1)) + mlp(patch.amax(dim=1))).unsqueeze(1)
        stats = torch.stack([x.mean(dim=-1), x.amax(dim=-1)], dim=1).view(b, 2, rows, cols)
        weights = torch.sigmoid(self.conv_bn(self.conv(stats))).view(b, n)
        weights, dist = _normalised_map(self, weights, uniform)
        x = F.relu(x * weights.unsqueeze(-1) + patch)
        return Pooled(x.mean(dim=1), dist)
