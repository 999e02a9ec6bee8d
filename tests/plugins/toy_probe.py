"""A probe family defined in one file outside epviz: importing it registers it everywhere.

tests/conftest.py imports this module, so "toy_attn" (and its variant) join every list
that comes from the registry: the contract tests, ``Setting.probe_set()``, the Explorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import epviz.probes
from epviz.probes import Pooled, Probe

__all__ = ["ToyAttentionProbe"]


@epviz.probes.register("toy_attn")
class ToyAttentionProbe(Probe):
    """One learned query q; a = softmax(X q / (t sqrt(D))) over the patch tokens; pooled = a X.

    The single predictor is a, and it alone produces every pooled column.

    Args:
        temperature: Softmax temperature t.
    """

    attentive = True
    sliced = True

    def __init__(self, dim: int, num_classes: int, temperature: float = 1.0, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid, temperature=float(temperature))
        self.temperature = float(temperature)
        self.query = nn.Parameter(torch.randn(self.dim) * 0.02)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return 1

    def predictor_slices(self) -> list[slice | None]:
        return [slice(0, self.width)]

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        scores = patch @ self.query / (self.temperature * self.dim**0.5)  # (B, N)
        attn, maps, _ = self._route_attention(scores.softmax(dim=-1).unsqueeze(1), uniform)  # (B, 1, N)
        return Pooled((attn @ patch).squeeze(1), maps)


epviz.probes.register("toy_attn_sharp", "toy_attn", temperature=0.5)
