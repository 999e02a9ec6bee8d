"""One full pre-norm ViT block (DINOv2 style) over the patch tokens, then the mean token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp
from torch import nn

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._registry import register

__all__ = ["DinoVitProbe"]


@register("dinovit")
class DinoVitProbe(MultiHeadProbe):
    """One full pre-norm ViT block (DINOv2 style) over the tokens, then the mean token.

    Self-attention with W_QKV (no bias) and W_O, MLP ratio 4, no LayerScale. Head h's
    map is its N x N self-attention averaged over the query rows (still a distribution
    over the N keys); "uniform" makes every row of head h uniform. Because the map is
    an average, ``hook_attn`` here only observes: editing it does not change the output.

    Args:
        heads: Attention heads (default 8).
    """

    attn_hook_in_path = False

    preferred_heads = 8

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.norm1 = nn.LayerNorm(self.dim)
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=False)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp = Mlp(self.dim, 4 * self.dim)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        q, k, v = self.qkv(self.norm1(patch)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        attn, maps, _ = self._route_attention(attn, uniform)
        x = patch + self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.dim))
        x = x + self.mlp(self.norm2(x))
        return Pooled(x.mean(dim=1), maps)
