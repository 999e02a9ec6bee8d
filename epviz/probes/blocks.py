"""Poolers built from whole transformer blocks: jepa, siglip, cait, dinovit, clip.

All follow the reference implementation's defaults. Attention weights are computed
explicitly rather than with fused kernels, because the probes must return them and
must be able to replace a head's weights by the uniform distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import AttentionPoolLatent, Mlp
from torch import nn

from epviz.probes._base import Pooled, Probe, resolve_heads, split_heads, uniform_rows
from epviz.probes._registry import register

__all__ = ["JepaProbe", "SiglipProbe", "CaitProbe", "DinoVitProbe", "ClipProbe"]


@register("jepa")
class JepaProbe(Probe):
    """V-JEPA's attentive pooler (depth 1).

    h = q + W_O MHCA(q, LN(x)); pooled = h + MLP(LN(h)); W_Q and W_KV with biases,
    MLP ratio 4. Initialisation as in V-JEPA: truncated normal (std 0.02) weights, zero
    biases, output projections scaled by 1/sqrt(2).

    Args:
        heads: Attention heads (default 16).
        mlp_ratio: Hidden width of the MLP over D.
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        grid: Sequence[int] | None = None,
    ) -> None:
        heads = resolve_heads(int(dim), heads, 16, "jepa")
        super().__init__(dim, num_classes, grid=grid, heads=heads, mlp_ratio=float(mlp_ratio))
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, self.dim))
        self.norm1 = nn.LayerNorm(self.dim)
        self.q = nn.Linear(self.dim, self.dim)
        self.kv = nn.Linear(self.dim, 2 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp = Mlp(self.dim, int(self.dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)
        for layer in (self.q, self.kv, self.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp.fc2.weight.div_(math.sqrt(2.0))
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        k, v = self.kv(self.norm1(patch)).chunk(2, dim=-1)
        q = split_heads(self.q(self.query)[None], self.heads)
        out, maps = self._attend(q, split_heads(k, self.heads), split_heads(v, self.heads), uniform, patch.shape[1])
        h = self.query + self.proj(out)
        return maps._replace(features=h + self.mlp(self.norm2(h)))


class _LatentPool(AttentionPoolLatent):
    """timm's AttentionPoolLatent with a forward that exposes (and can edit) the attention weights.

    timm's own forward uses a fused attention kernel that never materialises the
    weights; this forward computes the same function explicitly.
    """

    def forward_probe(self, probe: Probe, x: torch.Tensor, uniform: frozenset[int]) -> Pooled:
        """Pool `x` (B, N, D) with the heads of `probe` as predictors."""
        b, n, _ = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, maps = probe._attend(q[:, :, :1], k, v, uniform, n)
        y = self.proj_drop(self.proj(out))
        if self.mlp is not None:
            y = y + self.mlp(self.norm(y))
        return maps._replace(features=y)


@register("siglip")
class SiglipProbe(Probe):
    """SigLIP's attention-pooling head: timm's ``AttentionPoolLatent`` (one latent query).

    latent -> W_Q; tokens -> W_KV; heads -> W_O; then y + MLP(y). The module is timm's
    own (``self.attn_pool``); only its forward is re-done (see ``_LatentPool``) to
    expose the weights.

    Args:
        heads: Attention heads (default 8).
    """

    attentive = True

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        heads = resolve_heads(int(dim), heads, 8, "siglip")
        super().__init__(dim, num_classes, grid=grid, heads=heads)
        self.heads = heads
        self.attn_pool = _LatentPool(self.dim, num_heads=heads)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        return self.attn_pool.forward_probe(self, patch, uniform)


@register("cait")
class CaitProbe(Probe):
    """One CaiT class-attention block, then a LayerNorm.

    u = LN(concat(c, x)); c' = c + g1 * W_O CA(c, u); c'' = c' + g2 * MLP(LN(c'));
    pooled = LN(c''). The class query attends to itself and the N patch tokens; its
    maps are the patch part, renormalised, and "uniform" is over all N + 1 keys.
    LayerScale g1, g2 start at 1e-5.

    Args:
        heads: Attention heads (default 4).
        init_scale: Initial LayerScale value.
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        init_scale: float = 1e-5,
        grid: Sequence[int] | None = None,
    ) -> None:
        heads = resolve_heads(int(dim), heads, 4, "cait")
        super().__init__(dim, num_classes, grid=grid, heads=heads, init_scale=float(init_scale))
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, self.dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm1 = nn.LayerNorm(self.dim, eps=1e-6)
        self.q = nn.Linear(self.dim, self.dim)
        self.k = nn.Linear(self.dim, self.dim)
        self.v = nn.Linear(self.dim, self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.gamma1 = nn.Parameter(torch.full((self.dim,), float(init_scale)))
        self.norm2 = nn.LayerNorm(self.dim, eps=1e-6)
        self.mlp = Mlp(self.dim, 4 * self.dim)
        self.gamma2 = nn.Parameter(torch.full((self.dim,), float(init_scale)))
        self.final_norm = nn.LayerNorm(self.dim)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        c = self.query.expand(len(patch), -1, -1)
        u = self.norm1(torch.cat([c, patch], dim=1))
        q = split_heads(self.q(u[:, :1]), self.heads)
        k, v = split_heads(self.k(u), self.heads), split_heads(self.v(u), self.heads)
        out, maps = self._attend(q, k, v, uniform, patch.shape[1], extra_first=True)
        c = c[:, 0] + self.gamma1 * self.proj(out)
        c = c + self.gamma2 * self.mlp(self.norm2(c))
        return maps._replace(features=self.final_norm(c))


@register("dinovit")
class DinoVitProbe(Probe):
    """One full pre-norm ViT block (DINOv2 style) over the tokens, then the mean token.

    Self-attention with W_QKV (no bias) and W_O, MLP ratio 4, no LayerScale. Head h's
    map is its N x N self-attention averaged over the query rows (still a distribution
    over the N keys); "uniform" makes every row of head h uniform. Because the map is
    an average, ``hook_attn`` here only observes: editing it does not change the output.

    Args:
        heads: Attention heads (default 8).
    """

    attentive = True

    attn_hook_in_path = False

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        heads = resolve_heads(int(dim), heads, 8, "dinovit")
        super().__init__(dim, num_classes, grid=grid, heads=heads)
        self.heads = heads
        self.norm1 = nn.LayerNorm(self.dim)
        self.qkv = nn.Linear(self.dim, 3 * self.dim, bias=False)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp = Mlp(self.dim, 4 * self.dim)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        q, k, v = self.qkv(self.norm1(patch)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        attn = uniform_rows(attn, uniform)
        maps = self.hook_attn(attn.mean(dim=2))
        x = patch + self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.dim))
        x = x + self.mlp(self.norm2(x))
        return Pooled(x.mean(dim=1), maps)


@register("clip")
class ClipProbe(Probe):
    """CLIP's AttentionPool2d over ViT tokens.

    x = LN(tokens); prepend their mean (the GAP token); add a learned positional
    embedding of N + 1 rows; multi-head self-attention with W_QKV and W_O (biases);
    the output is token 0. Only token 0's query is computed, which gives the same
    output as the full self-attention. Head h's map is token 0's row over the patch
    keys, renormalised; "uniform" is over all N + 1 keys (the GAP token included).

    The positional embedding fixes N at build: from ``num_tokens``, else from
    ``grid``, else the default 14x14 grid (196 tokens).

    Args:
        heads: Attention heads (default 4).
        num_tokens: Number N of patch tokens the probe will see.
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        num_tokens: int | None = None,
        grid: Sequence[int] | None = None,
    ) -> None:
        heads = resolve_heads(int(dim), heads, 4, "clip")
        if num_tokens is None:
            num_tokens = 196 if grid is None else int(grid[0]) * int(grid[1])
        num_tokens = int(num_tokens)
        if grid is not None and int(grid[0]) * int(grid[1]) != num_tokens:
            raise ValueError(f"probe 'clip': grid {tuple(grid)} has {int(grid[0]) * int(grid[1])} cells but num_tokens={num_tokens}")
        super().__init__(dim, num_classes, grid=grid, heads=heads, num_tokens=num_tokens)
        self.heads = heads
        self.num_tokens = num_tokens
        self.token_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens + 1, self.dim))
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        nn.init.trunc_normal_(self.pos_embed, std=self.dim**-0.5)
        nn.init.trunc_normal_(self.qkv.weight, std=self.dim**-0.5)
        nn.init.zeros_(self.qkv.bias)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        b, n, _ = patch.shape
        if n != self.num_tokens:
            raise ValueError(
                f"probe 'clip' was built for {self.num_tokens} patch tokens (its positional embedding has "
                f"{self.num_tokens} + 1 rows) but got {n}; build it with num_tokens={n} or grid=(rows, cols)"
            )
        x = self.token_norm(patch)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)
        w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
        b_q, b_kv = self.qkv.bias.split([self.dim, 2 * self.dim])
        q = split_heads(nn.functional.linear(x[:, :1], w_q, b_q), self.heads)
        k, v = nn.functional.linear(x, w_kv, b_kv).chunk(2, dim=-1)
        out, maps = self._attend(q, split_heads(k, self.heads), split_heads(v, self.heads), uniform, n, extra_first=True)
        return maps._replace(features=self.proj(out))
