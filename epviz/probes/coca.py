"""CoCa's attentional pooler, read at its first query (multi-query attention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epviz.probes._base import Pooled, Probe
from epviz.probes._layers import merge_heads, query_weights, split_heads
from epviz.probes._registry import register

__all__ = ["CocaProbe"]


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
            raise ValueError(
                f"probe 'coca': heads, dim_head and num_queries must be positive, got {heads}, {dim_head}, {num_queries}"
            )
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
        attn, maps, _ = self._route_attention(query_weights(q, k), uniform)
        return Pooled(self.to_out(merge_heads(attn, v)), maps)
