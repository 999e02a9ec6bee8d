"""CBAM pooling: channel attention, then a 7x7 spatial attention map, residual, ReLU, GAP.

The spatial map w is a sigmoid, not a softmax; :meth:`~epviz.probes.Probe._route_attention`
hands ``hook_attn`` the normalised map w / sum(w) and continues with its output times
sum(w), so the hook stays in the computation path. "Uniform" replaces w by its mean.
Tokens are treated as a feature map in row-major grid order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epviz.probes._base import Pooled, Probe
from epviz.probes._registry import register

__all__ = ["CbamProbe"]


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

    def _channel_mlp(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z)))

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        rows, cols = self._grid_for(n)
        x = patch * torch.sigmoid(self._channel_mlp(patch.mean(dim=1)) + self._channel_mlp(patch.amax(dim=1))).unsqueeze(1)
        stats = torch.stack([x.mean(dim=-1), x.amax(dim=-1)], dim=1).view(b, 2, rows, cols)
        weights = torch.sigmoid(self.conv_bn(self.conv(stats))).view(b, n)
        weights, maps, _ = self._route_attention(weights, uniform)  # (B, N)
        x = F.relu(x * weights.unsqueeze(-1) + patch)
        return Pooled(x.mean(dim=1), maps)
