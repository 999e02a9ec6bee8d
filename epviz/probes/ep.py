"""Efficient Probing (EP): M learned queries, raw tokens as keys, one sliced value projection.

With tokens X (N x D) and queries U (M x D)::

    A     = softmax_over_tokens(U X^T / sqrt(D))      (M x N), row j = predictor j
    V     = X W_V                                     (N x D_o), D_o = D / d_out
    y_j   = a_j V^(j)                                 V^(j): columns [j*D_o/M, (j+1)*D_o/M)
    y     = concat(y_1 .. y_M)                        (D_o)

The pooling is linear in X, so y_j = (a_j X) W_V^(j): :meth:`EfficientProbe._pool`
pools the raw tokens first and projects the M pooled vectors afterwards (the fast
form). :meth:`EfficientProbe.pool_direct` projects every token first (the direct
form); both give the same y.

``ep_all`` appends the prefix tokens ([CLS], registers) as extra keys and values (not
as queries): by default every prefix token as its own key (``prefix="all"``, ours); with
``prefix="first"`` only [CLS] (the reference's DINOv2 wrapper, which drops registers), with
``prefix="mean"`` one key, the mean of the prefix tokens (the reference's timm/CLIP wrapper).
Without registers the three are the same. Its :meth:`~epviz.probes.Probe.attention` returns each query's
distribution restricted to the patch tokens and renormalised to sum 1; the mass on
the prefix tokens is :meth:`EfficientProbeAll.prefix_mass`.

Uniform ablation has a shortcut here: a uniform query's output is mean(keys) W_V^(j),
so :meth:`EfficientProbe.ablated_logits` pools once and swaps one query's slice at a
time, with one batched norm + head call for all M queries. The other controls take the
same shortcut: with every query's map replaced by m_j at once, one pooled pass gives all M
replaced slices y_j = (m_j X) W_V^(j) (``ep_all`` keeps each query's prefix weights and puts
``m_j * patch_mass_j`` on the patch keys); a zeroed query's slice is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epviz.probes._base import Pooled, Probe, Routed
from epviz.probes._layers import divisors
from epviz.probes._registry import register
from epviz.probes.linear import PREFIX_CHOICES, check_prefix

__all__ = ["EfficientProbe", "EfficientProbeAll"]


@register("ep")
class EfficientProbe(Probe):
    """EP over the patch tokens.

    Attributes:
        queries: Learned queries U, shape (M, D), initialised N(0, 0.02^2).
        value: Value projection D -> D / d_out, no bias.
    """

    attentive = True
    sliced = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_queries: int = 32,
        d_out: int = 1,
        grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dim, num_classes, grid=grid, num_queries=int(num_queries), d_out=int(d_out))
        _check_shapes(self.name, self.dim, int(num_queries), int(d_out))
        self.num_queries = int(num_queries)
        self.d_out = int(d_out)
        self.queries = nn.Parameter(torch.randn(self.num_queries, self.dim) * 0.02)
        self.value = nn.Linear(self.dim, self.dim // self.d_out, bias=False)
        self._finish(self.dim // self.d_out)

    @property
    def num_predictors(self) -> int:
        return self.num_queries

    @property
    def slice_width(self) -> int:
        """Columns of y each query owns: D_o / M."""
        return self.width // self.num_queries

    def predictor_slices(self) -> list[slice | None]:
        c = self.slice_width
        return [slice(j * c, (j + 1) * c) for j in range(self.num_queries)]

    def _keys(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        return patch

    def _weights(self, keys: torch.Tensor, num_patch: int, uniform: frozenset[int]) -> Routed:
        # one (B*L, D) x (D, M) product; scaling the small query matrix instead of the scores saves a pass
        scores = F.linear(keys, self.queries * self.dim**-0.5)  # (B, L, M)
        return self._route_attention(scores.softmax(dim=1).transpose(1, 2), uniform, num_patch=num_patch)  # (B, M, L)

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        keys = self._keys(patch, prefix)
        attn, maps, nonpatch = self._weights(keys, patch.shape[1], uniform)
        pooled = torch.bmm(attn, keys)  # (B, M, D): a_j X
        w = self.value.weight.view(self.num_queries, self.slice_width, self.dim)  # W_V^(j) as (c, D)
        y = torch.einsum("bmd,mcd->bmc", pooled, w.to(pooled.dtype))
        return Pooled(y.reshape(len(patch), self.width), maps, nonpatch)

    def _token_values(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Query m's weights over the keys, and each key's value W_V^(m) x_l in query m's slice (zeros elsewhere)."""
        keys = self._keys(patch, prefix)
        weights = self._weights(keys, patch.shape[1], frozenset()).weights  # (B, M, L)
        w = self.value.weight.view(self.num_queries, self.slice_width, self.dim)
        sliced = torch.einsum("bld,mcd->bmlc", keys, w.to(keys.dtype))  # (B, M, L, c)
        values = sliced.new_zeros(*sliced.shape[:3], self.num_queries, self.slice_width)
        index = torch.arange(self.num_queries, device=keys.device)
        values[:, index, :, index] = sliced.permute(1, 0, 2, 3)  # query m's value lands in its own slice
        return weights, values.flatten(-2)

    def has_stacked_form(self) -> bool:
        """EP's pooling stacks by hand unless a subclass changes it, its norm or head is swapped, or a hook watches it."""
        cls = type(self)
        return (
            all(getattr(cls, method) is getattr(EfficientProbe, method) for method in _POOLING_METHODS)
            and type(self.norm) is nn.BatchNorm1d
            and type(self.head) is nn.Linear
            and not _has_hooks(self.hook_attn)
            and not _has_hooks(self.hook_pooled)
        )

    def stacked_logits(self, state, patch_tokens, prefix_tokens=None) -> torch.Tensor:
        """K stacked EP heads in one pass: one GEMM for all K x M scores, one bmm for the pooling, one
        einsum for the sliced value projections, BatchNorm over K x D_o channels (each head its own statistics)."""
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        keys = self._keys(patch, prefix)  # (B, L, D)
        queries = state["queries"]  # (K, M, D)
        k, m, d = queries.shape
        b = len(keys)
        scores = F.linear(keys, (queries * d**-0.5).reshape(k * m, d))  # (B, L, K M)
        pooled = torch.bmm(scores.softmax(dim=1).transpose(1, 2), keys).view(b, k, m, d)  # a_j X of every head
        w = state["value.weight"].view(k, m, self.slice_width, d)
        y = torch.einsum("bkmd,kmcd->bkmc", pooled, w.to(pooled.dtype)).reshape(b, k * self.width)
        norm, tracked = self.norm, state["norm.num_batches_tracked"]
        if self.training:
            tracked.add_(1)
        momentum: float | None = norm.momentum
        if momentum is None:  # a cumulative average, as BatchNorm
            momentum = 1.0 / float(tracked.flatten()[0])
        y = F.batch_norm(
            y,
            state["norm.running_mean"].view(-1),
            state["norm.running_var"].view(-1),
            None,
            None,
            self.training,
            momentum,
            norm.eps,
        ).view(b, k, self.width)
        head_weight, head_bias = state["head.weight"], state["head.bias"]  # (K, C, W), (K, C)
        return torch.einsum("bkw,kcw->kbc", y, head_weight.to(y.dtype)) + head_bias[:, None].to(y.dtype)

    @property
    def fast_ablation(self) -> bool:
        """Whether :meth:`ablated_logits` takes the slice-swap shortcut.

        It does when the shortcut equals the per-predictor loop: the probe is in eval mode
        (the batched norm call would otherwise mix batch statistics), ``hook_attn`` and
        ``hook_pooled`` carry no forward hooks or pre-hooks, and the class keeps EP's pooling.
        """
        cls = type(self)
        return (
            not self.training
            and all(getattr(cls, method) is getattr(EfficientProbe, method) for method in _POOLING_METHODS)
            and not _has_hooks(self.hook_attn)
            and not _has_hooks(self.hook_pooled)
        )

    def ablated_logits(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        control: str = "uniform",
        replacement: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full logits (B, C) and the logits with each query ablated in turn (M, B, C).

        With :attr:`fast_ablation`, y is pooled once, every query's ablated slice comes from
        one more small pass (``"uniform"``: mean(keys) W_V^(j); ``"replace"``: all M replaced
        maps pooled together, (m_j X) W_V^(j); ``"zero"``: 0), and the M ablated features go
        through ``norm`` and ``head`` in one batched call; otherwise the per-query loop of
        :meth:`Probe.ablated_logits` runs. Arguments as there.
        """
        if not self.fast_ablation:
            return super().ablated_logits(patch_tokens, prefix_tokens, control, replacement)
        if control != "uniform":
            return self._ablated_control(patch_tokens, prefix_tokens, control, replacement)
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        y = self.pooled(patch, prefix)  # (B, D_o), pooled once
        keys = self._keys(patch, prefix)
        w = self.value.weight.view(self.num_queries, self.slice_width, self.dim)
        y_uniform = torch.einsum("bd,mcd->bmc", keys.mean(dim=1), w.to(keys.dtype)).reshape(y.shape)
        return self._swap_slices(y, y_uniform)

    def _ablated_control(
        self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None, control: str, replacement: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shortcut of :meth:`ablated_logits` for the ``"replace"`` and ``"zero"`` controls."""
        replacement = self._check_control(control, replacement)
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        keys = self._keys(patch, prefix)
        n = patch.shape[1]
        attn = self._weights(keys, n, frozenset()).weights  # (B, M, L), the patch keys first
        w = self.value.weight.view(self.num_queries, self.slice_width, self.dim).to(keys.dtype)
        y = torch.einsum("bmd,mcd->bmc", torch.bmm(attn, keys), w).reshape(len(patch), self.width)
        if control == "zero" or replacement is None:
            return self._swap_slices(y, torch.zeros_like(y))
        if replacement.shape[2] != 1 or replacement.shape[-1] != n:
            raise ValueError(
                f"probe '{self.name}': each query has one map over {n} patch tokens; "
                f"the replacement has shape {tuple(replacement.shape)}"
            )
        maps = replacement[:, :, 0].to(device=attn.device, dtype=attn.dtype)  # (B or 1, M, N)
        mass = attn[..., :n].sum(-1, keepdim=True)  # (B, M, 1): 1 for ep, the patch share for ep_all
        replaced = torch.cat([maps * mass, attn[..., n:]], dim=-1)  # every query replaced at once
        y_replaced = torch.einsum("bmd,mcd->bmc", torch.bmm(replaced, keys), w).reshape(y.shape)
        return self._swap_slices(y, y_replaced)

    def _swap_slices(self, y: torch.Tensor, y_alt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of y (B, C) and of y with query j's slice taken from `y_alt`, for every j (M, B, C)."""
        k = self.num_predictors
        owner = torch.arange(self.width, device=y.device) // self.slice_width  # column -> query
        swap = owner.unsqueeze(0) == torch.arange(k, device=y.device).unsqueeze(1)  # (M, D_o)
        ablated = torch.where(swap.unsqueeze(1), y_alt.unsqueeze(0), y.unsqueeze(0))  # (M, B, D_o)
        logits = self.head(self.norm(torch.cat([y, ablated.reshape(-1, self.width)])))
        full, rest = logits[: len(y)], logits[len(y) :]
        return full, rest.view(k, len(y), -1)

    def pool_direct(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        uniform: Iterable[int] | int | None = None,
    ) -> torch.Tensor:
        """The pooled feature y computed in the direct form: project every token, then pool.

        Same result as :meth:`pooled` at about M times the cost; kept as a reference.
        """
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        keys = self._keys(patch, prefix)
        attn = self._weights(keys, patch.shape[1], self._uniform_set(uniform)).weights
        values = self.value(keys).view(*keys.shape[:2], self.num_queries, self.slice_width)  # (B, L, M, c)
        y = torch.einsum("bml,blmc->bmc", attn, values)
        return y.reshape(len(patch), self.width)


@register("ep_all")
class EfficientProbeAll(EfficientProbe):
    """EP whose keys and values are the patch tokens followed by the prefix tokens.

    Maps are over the patch tokens, renormalised; "uniform" means uniform over all the keys.

    Args:
        prefix: Which prefix tokens become keys: ``"all"`` (default, ours): every prefix token
            (N + P keys); ``"first"``: [CLS] only; ``"mean"``: one key, the mean of the prefix
            tokens (N + 1 keys each). Recorded in ``config`` only when not the default.
        Other arguments as :class:`EfficientProbe`.
    """

    needs_prefix = True

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_queries: int = 32,
        d_out: int = 1,
        grid: Sequence[int] | None = None,
        prefix: str = "all",
    ) -> None:
        super().__init__(dim, num_classes, num_queries=num_queries, d_out=d_out, grid=grid)
        self.prefix = check_prefix(self.name, prefix, ("all", *PREFIX_CHOICES))
        if self.prefix != "all":
            self.config["prefix"] = self.prefix

    def _keys(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        assert prefix is not None  # needs_prefix: _validate refuses calls without prefix tokens
        if self.prefix == "first":
            prefix = prefix[:, :1]
        elif self.prefix == "mean":
            prefix = prefix.mean(dim=1, keepdim=True)
        return torch.cat([patch, prefix], dim=1)

    def prefix_mass(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """Attention mass (B, M) each query puts on the prefix tokens."""
        return self.nonpatch_mass(patch_tokens, prefix_tokens)


# Methods whose EP versions the ablation shortcut relies on; a subclass overriding one falls back to the loop.
_POOLING_METHODS = ("forward", "pooled", "_pool", "_weights", "_route_attention")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _check_shapes(name: str, dim: int, num_queries: int, d_out: int) -> None:
    if d_out < 1 or dim % d_out:
        raise ValueError(f"probe '{name}': d_out={d_out} must divide D={dim}; valid d_out: {divisors(dim)}")
    width = dim // d_out
    if num_queries < 1 or width % num_queries:
        raise ValueError(
            f"probe '{name}': D={dim} must be divisible by d_out*num_queries = {d_out}*{num_queries} = {d_out * num_queries}. "
            f"With d_out={d_out}, valid num_queries: {divisors(width)}"
        )


# Variants: EP with 16 queries is the standard EP of the zoo comparisons (D = 192 must be divisible by
# d_out * M for d_out in 1, 2, 4); ep16_d2 / ep16_d4 shrink the value space D_o = D / d_out.
register("ep16", "ep", standard=True, num_queries=16)
register("ep_all16", "ep_all", standard=True, num_queries=16)
register("ep16_d2", "ep", num_queries=16, d_out=2)
register("ep16_d4", "ep", num_queries=16, d_out=4)
