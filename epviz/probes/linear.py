"""Probes without attention predictors: linear probing on [CLS], and global average pooling.

Register tokens (ours: a documented choice). The prefix tokens of a backbone are [CLS]
followed by its register tokens (DINOv2-reg: 1 + 4). The reference implementation is not
consistent here: its timm/CLIP wrapper averages all prefix tokens into the "[CLS]" that LP
reads, its DINOv2 wrapper drops the registers. ``cls`` reads prefix token 0, [CLS]
(``prefix="first"``, the default, as the DINOv2 wrapper); ``prefix="mean"`` averages every
prefix token, as the timm wrapper. Without registers the two are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from epviz.probes._base import Pooled, Probe
from epviz.probes._registry import register

__all__ = ["ClsProbe", "GapProbe"]


PREFIX_CHOICES = ("first", "mean")


def check_prefix(name: str, prefix: str, choices: Sequence[str]) -> str:
    """Validate a probe's ``prefix`` option (which prefix tokens it reads)."""
    if prefix not in choices:
        raise ValueError(
            f"probe '{name}': prefix must be one of {list(choices)} (first: [CLS] only; mean: the mean of "
            f"[CLS] and the register tokens{'; all: every prefix token as its own key' if 'all' in choices else ''}), "
            f"got {prefix!r}"
        )
    return prefix


@register("cls")
class ClsProbe(Probe):
    """Linear probing (LP): the [CLS] token -> norm -> head.

    Args:
        dim: Token width D.
        num_classes: Number of classes C.
        grid: Patch grid (unused).
        prefix: ``"first"`` (default): prefix token 0, [CLS]; ``"mean"``: the mean of all prefix
            tokens ([CLS] and the registers), as the reference's timm/CLIP wrapper. Recorded in
            ``config`` only when not the default.
    """

    needs_prefix = True

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None, prefix: str = "first") -> None:
        super().__init__(dim, num_classes, grid=grid)
        self.prefix = check_prefix(self.name, prefix, PREFIX_CHOICES)
        if self.prefix != "first":
            self.config["prefix"] = self.prefix
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        assert prefix is not None  # needs_prefix: _validate refuses calls without prefix tokens
        return Pooled(prefix[:, 0] if self.prefix == "first" else prefix.mean(dim=1))

    def _token_values(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """All the weight on the prefix tokens it reads (no patch token contributes)."""
        assert prefix is not None
        weights = patch.new_zeros(len(patch), 1, patch.shape[1] + prefix.shape[1])
        if self.prefix == "first":
            weights[:, 0, patch.shape[1]] = 1.0
        else:
            weights[:, 0, patch.shape[1] :] = 1.0 / prefix.shape[1]
        return weights, torch.cat([patch, prefix], dim=1)[:, None]


@register("gap")
class GapProbe(Probe):
    """Global average pooling of the patch tokens -> norm -> head."""

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, grid=grid)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        return Pooled(patch.mean(dim=1))

    def _token_values(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One uniform predictor over the patch tokens."""
        return patch.new_full((len(patch), 1, patch.shape[1]), 1.0 / patch.shape[1]), patch[:, None]
