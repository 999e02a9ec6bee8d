"""Cross-attention poolers with learned queries: mhca, aim, cae, coca.

Each head of each pooler is one attention predictor: its query's distribution over
the patch tokens. The designs (and parameter counts) follow the reference
implementation's defaults; where a default head count does not divide a small D,
the largest divisor below it is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import Pooled, Probe, resolve_heads, split_heads
from epviz.probes._registry import register

__all__ = ["MultiHeadCrossAttentionProbe", "AimProbe", "CaeProbe", "CocaProbe"]


def _head_slices(width: int, heads: int) -> list[slice]:
    d = width // heads
    return [slice(h * d, (h + 1) * d) for h in range(heads)]


@register("mhca")
class MultiHeadCrossAttentionProbe(Probe):
    """Multi-head cross-attention of one learned query over the tokens.

    y = W_O concat_h softmax((q W_Q^h)(X W_K^h)^T / sqrt(d)) X W_V^h, which equals
    ``torch.nn.MultiheadAttention`` with the same weights. The projections have no
    biases by default (``bias=False``), which gives the reference count of 4 D^2 + D
    pooling parameters; ``bias=True`` adds 4 D.

    Args:
        heads: Attention heads; default D // 64 (12 at D=768).
        bias: Whether W_Q, W_K, W_V, W_O have biases.
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int | None = None,
        bias: bool = False,
        grid: Sequence[int] | None = None,
    ) -> None:
        heads = resolve_heads(int(dim), heads, max(1, int(dim) // 64), "mhca")
        super().__init__(dim, num_classes, grid=grid, heads=heads, bias=bool(bias))
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.q_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.k_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.v_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self.out_proj = nn.Linear(self.dim, self.dim, bias=bias)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.q_proj(self.query)[None], self.heads)  # (1, H, 1, d)
        k = split_heads(self.k_proj(patch), self.heads)
        v = split_heads(self.v_proj(patch), self.heads)
        out, maps = self._attend(q, k, v, uniform, patch.shape[1])
        return maps._replace(features=self.out_proj(out))


@register("aim")
class AimProbe(Probe):
    """AIM's attention-pooling classifier.

    Tokens pass a non-affine BatchNorm; one learned query (no W_Q) attends with W_K,
    W_V (no biases) and no output projection, so head h alone produces columns
    [h*D/H, (h+1)*D/H) of the pooled feature.

    Args:
        heads: Attention heads (default 16).
    """

    attentive = True
    sliced = True

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        heads = resolve_heads(int(dim), heads, 16, "aim")
        super().__init__(dim, num_classes, grid=grid, heads=heads)
        self.heads = heads
        self.token_norm = nn.BatchNorm1d(self.dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.k = nn.Linear(self.dim, self.dim, bias=False)
        self.v = nn.Linear(self.dim, self.dim, bias=False)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def predictor_slices(self) -> list[slice | None]:
        return _head_slices(self.width, self.heads)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        x = self.token_norm(patch.transpose(1, 2)).transpose(1, 2)
        q = split_heads(self.query[None], self.heads)
        out, maps = self._attend(q, split_heads(self.k(x), self.heads), split_heads(self.v(x), self.heads), uniform, patch.shape[1])
        return maps._replace(features=out)


@register("cae")
class CaeProbe(Probe):
    """CAE's attentive block: a learned query cross-attends with LayerNorm on the q, k, v inputs.

    W_Q, W_K, W_V have no bias; W_O has one. The reference module also holds a fourth
    LayerNorm that its forward never uses; it is kept here as ``unused_norm`` only so
    the parameter count matches the reference (2 D of the 4 D^2 + 10 D). The query is
    initialised N(0, 0.02^2) (the reference starts it at zero).

    Args:
        heads: Attention heads (default 8).
    """

    attentive = True

    def __init__(self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None) -> None:
        heads = resolve_heads(int(dim), heads, 8, "cae")
        super().__init__(dim, num_classes, grid=grid, heads=heads)
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, self.dim) * 0.02)
        self.norm_q = nn.LayerNorm(self.dim)
        self.norm_k = nn.LayerNorm(self.dim)
        self.norm_v = nn.LayerNorm(self.dim)
        self.unused_norm = nn.LayerNorm(self.dim)
        self.q = nn.Linear(self.dim, self.dim, bias=False)
        self.k = nn.Linear(self.dim, self.dim, bias=False)
        self.v = nn.Linear(self.dim, self.dim, bias=False)
        self.proj = nn.Linear(self.dim, self.dim)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.q(self.norm_q(self.query))[None], self.heads)
        k = split_heads(self.k(self.norm_k(patch)), self.heads)
        v = split_heads(self.v(self.norm_v(patch)), self.heads)
        out, maps = self._attend(q, k, v, uniform, patch.shape[1])
        return maps._replace(features=self.proj(out))


@register("coca")
class CocaProbe(Probe):
    """CoCa's attentional pooler, read at its first query.

    Queries pass a bias-free LayerNorm and W_Q into `heads` heads of `dim_head`; all
    heads share one key/value head of `dim_head` (multi-query attention); W_O maps
    heads*dim_head back to D. The pooled feature is the output of query 0, so the
    predictors are the heads of query 0. Only query 0 is computed (every step is
    per-query, so the output is identical to computing all of them); the other
    ``num_queries - 1`` queries are kept, untouched by training, so the parameter count
    matches the reference (196 queries, N(0, 1) initialisation as there).

    Args:
        heads: Query heads (default 8).
        dim_head: Width of each head and of the shared key/value head (default 64).
        num_queries: Learned queries (default 196).
    """

    attentive = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int = 8,
        dim_head: int = 64,
        num_queries: int = 196,
        grid: Sequence[int] | None = None,
    ) -> None:
        if int(heads) < 1 or int(dim_head) < 1 or int(num_queries) < 1:
            raise ValueError(f"probe 'coca': heads, dim_head and num_queries must be positive, got {heads}, {dim_head}, {num_queries}")
        super().__init__(dim, num_classes, grid=grid, heads=int(heads), dim_head=int(dim_head), num_queries=int(num_queries))
        self.heads, self.dim_head = int(heads), int(dim_head)
        inner = self.heads * self.dim_head
        self.queries = nn.Parameter(torch.randn(int(num_queries), self.dim))
        self.query_norm = nn.LayerNorm(self.dim, bias=False)
        self.to_q = nn.Linear(self.dim, inner, bias=False)
        self.to_kv = nn.Linear(self.dim, 2 * self.dim_head, bias=False)
        self.to_out = nn.Linear(inner, self.dim, bias=False)
        self._finish(self.dim)

    @property
    def num_predictors(self) -> int:
        return self.heads

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        q = split_heads(self.to_q(self.query_norm(self.queries[:1]))[None], self.heads)  # (1, H, 1, d)
        k, v = self.to_kv(patch).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, N, d) each
        out, maps = self._attend(q, k, v, uniform, patch.shape[1])
        return maps._replace(features=self.to_out(out))
