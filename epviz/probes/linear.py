"""Probes without attention predictors: linear probing on [CLS], and global average pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epviz.probes._base import Pooled, Probe
from epviz.probes._registry import register

__all__ = ["ClsProbe", "GapProbe"]


@register("cls")
class ClsProbe(Probe):
    """Linear probing (LP): the [CLS] token (prefix index 0) -> norm -> head."""

    needs_prefix = True

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        return Pooled(prefix[:, 0])


@register("gap")
class GapProbe(Probe):
    """Global average pooling of the patch tokens -> norm -> head."""

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        return Pooled(patch.mean(dim=1))
