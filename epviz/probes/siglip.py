"""SigLIP's attention-pooling head: timm's ``AttentionPoolLatent`` with one latent query.

timm's own forward uses a fused attention kernel that never materialises the weights;
the probe runs the module's submodules itself and computes the same function
explicitly, so that the weights can be returned and made uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import AttentionPoolLatent

from epviz.probes._base import MultiHeadProbe, Pooled
from epviz.probes._layers import merge_heads, query_weights
from epviz.probes._registry import register

__all__ = ["SiglipProbe"]


@register("siglip")
class SiglipProbe(MultiHeadProbe):
    """SigLIP's attention-pooling head: timm's ``AttentionPoolLatent`` (one latent query).

    latent -> W_Q; tokens -> W_KV; heads -> W_O; then y + MLP(y). The module is timm's
    own (``self.attn_pool``, so the parameters keep timm's names); :meth:`_pool` reads its
    submodules to expose the weights.

    Args:
        heads: Attention heads (default 8).
    """

    preferred_heads = 8

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(dim, num_classes, heads=heads, grid=grid)
        self.attn_pool = AttentionPoolLatent(self.dim, num_heads=self.heads)
        self._finish(self.dim)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        pool = self.attn_pool
        b, n, _ = patch.shape
        x = patch if pool.pos_embed is None else patch + pool.pos_embed.unsqueeze(0).to(patch.dtype)
        q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
        k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = pool.q_norm(q), pool.k_norm(k)
        attn, maps, _ = self._route_attention(query_weights(q[:, :, :1], k), uniform)  # the first latent's heads
        y = pool.proj_drop(pool.proj(merge_heads(attn, v)))
        if pool.mlp is not None:
            y = y + pool.mlp(pool.norm(y))
        return Pooled(y, maps)
