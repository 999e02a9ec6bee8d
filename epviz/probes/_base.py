"""The common probe interface: pool -> BatchNorm1d -> Linear, plus hook points.

Every probe maps patch tokens (B, N, D) and optional prefix tokens (B, P, D) to
class logits through three stages::

    pooled = pool(patch, prefix)              # (B, width)   -> hook_pooled
    logits = head(norm(pooled))               # norm: BatchNorm1d(width, affine=False, eps=1e-6)

Attentive probes also produce one distribution over the N patch tokens per
*attention predictor* (an EP query, an attention head, a spatial map). Those maps,
shaped (B, K, N), pass through ``hook_attn``.

Hook points are identity modules, so ``register_forward_hook`` and captum's layer
methods see the tensors. ``hook_pooled`` always sits in the computation path.
``hook_attn`` sits in the path for every probe whose class attribute
``attn_hook_in_path`` is True: editing its output edits the logits. When a
predictor also attends to keys that are not patch tokens (the prefix tokens of
``ep_all``, the GAP token of ``clip``, the query token of ``cait``), the hook sees
the patch part renormalised to sum 1, and the probe rebuilds the full weights as
``map * patch_mass``; the mass on the other keys is reported by
:meth:`Probe.nonpatch_mass`.

"Uniform" (``forward(..., uniform=[j])``) replaces predictor j's distribution by
the uniform one over all the keys it attends to (1/N for patch-only predictors,
1/(N+E) when it also sees E other keys). For spatial-map probes (dolg, cbam) the
map is replaced by its mean value, which is the same thing once the map is
normalised to sum 1.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

__all__ = ["HookPoint", "Probe", "Pooled", "divisors", "resolve_heads", "split_heads", "trainable_params", "uniform_rows"]


class HookPoint(nn.Module):
    """An identity module: a named place where hooks can read or edit a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Pooled(NamedTuple):
    """What a probe's pooling stage returns.

    Attributes:
        features: Pooled features, shape (B, width).
        maps: Predictor distributions over the patch tokens, shape (B, K, N), or None when K == 0.
        nonpatch: Attention mass each predictor puts on keys that are not patch tokens,
            shape (B, K), or None when every key is a patch token.
    """

    features: torch.Tensor
    maps: torch.Tensor | None = None
    nonpatch: torch.Tensor | None = None


def trainable_params(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def divisors(n: int) -> list[int]:
    """All positive divisors of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_heads(dim: int, heads: int | None, preferred: int, name: str) -> int:
    """The number of attention heads to use.

    Args:
        dim: Width the heads split.
        heads: An explicit choice, or None for the default.
        preferred: The reference implementation's head count, used when it divides `dim`;
            otherwise the largest divisor of `dim` below it.
        name: Probe name, for error messages.
    """
    if heads is None:
        return max(d for d in divisors(dim) if d <= max(1, preferred))
    heads = int(heads)
    if heads < 1 or dim % heads:
        valid = [d for d in divisors(dim) if d <= 64]
        raise ValueError(f"probe '{name}': heads={heads} must divide the token width D={dim}; valid choices include {valid}")
    return heads


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reshape (B, L, H*d) to (B, H, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def uniform_rows(attn: torch.Tensor, rows: frozenset[int], axis: int = 1) -> torch.Tensor:
    """Replace the distributions at positions `rows` of `axis` by the uniform one.

    Args:
        attn: Attention weights whose last axis is the key axis (sums to 1).
        rows: Predictor indices along `axis` to make uniform.
        axis: The predictor axis.
    """
    if not rows:
        return attn
    mask = torch.zeros(attn.shape[axis], dtype=torch.bool, device=attn.device)
    mask[sorted(rows)] = True
    shape = [1] * attn.ndim
    shape[axis] = attn.shape[axis]
    fill = torch.full((), 1.0 / attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return torch.where(mask.view(shape), fill, attn)


class Probe(nn.Module):
    """Base class of every probe.

    Subclasses build their pooling modules, call :meth:`_finish` with the pooled width,
    and implement :meth:`_pool` and :attr:`num_predictors`.

    Attributes:
        name: Registry name of the family (set by ``@register``).
        attentive: Whether the family has attention predictors (``num_predictors > 0``).
        sliced: Whether each predictor alone produces its own columns of the pooled feature
            (:meth:`predictor_slices` holds no None).
        needs_prefix: Whether the probe reads prefix tokens and cannot run without them.
        attn_hook_in_path: Whether ``hook_attn``'s output feeds the computation.
        dim: Token width D.
        num_classes: Number of classes C.
        width: Width of the pooled feature.
        grid: Patch grid (rows, cols) when known, else None.
        config: Build options (name, dim, num_classes and the resolved options).
    """

    name: ClassVar[str] = "probe"
    attentive: ClassVar[bool] = False
    sliced: ClassVar[bool] = False
    needs_prefix: ClassVar[bool] = False
    attn_hook_in_path: ClassVar[bool] = True

    def __init__(self, dim: int, num_classes: int, grid: Sequence[int] | None = None, **options) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"probe '{self.name}': dim must be a positive integer, got {dim}")
        if int(num_classes) < 1:
            raise ValueError(f"probe '{self.name}': num_classes must be a positive integer, got {num_classes}")
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.grid = None if grid is None else _as_grid(grid, self.name)
        self.config = {"name": self.name, "dim": self.dim, "num_classes": self.num_classes, **options}
        if self.grid is not None:
            self.config["grid"] = list(self.grid)
        self.hook_attn = HookPoint()  # (B, K, N): one distribution over patch tokens per predictor
        self.hook_pooled = HookPoint()  # (B, width): pooled feature before norm

    def _finish(self, width: int) -> None:
        """Create the BatchNorm and the classifier for a pooled feature of `width`."""
        self.width = int(width)
        self.norm = nn.BatchNorm1d(self.width, affine=False, eps=1e-6)
        self.head = nn.Linear(self.width, self.num_classes)

    @property
    def num_predictors(self) -> int:
        """Number K of attention predictors."""
        return 0

    # --- the three public verbs -------------------------------------------------------

    def forward(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        uniform: Iterable[int] | int | None = None,
    ) -> torch.Tensor:
        """Class logits, shape (B, C).

        Args:
            patch_tokens: Patch tokens (B, N, D).
            prefix_tokens: Prefix tokens (B, P, D) ([CLS] at index 0), or None.
            uniform: Predictors whose distributions are replaced by the uniform one.
        """
        return self.head(self.norm(self.features(patch_tokens, prefix_tokens, uniform)))

    def features(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        uniform: Iterable[int] | int | None = None,
    ) -> torch.Tensor:
        """The pooled feature before ``norm`` (what ``hook_pooled`` sees), shape (B, width)."""
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        out = self._pool(patch, prefix, self._uniform_set(uniform))
        return self.hook_pooled(out.features)

    def attention(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention maps (B, K, N): one distribution over the N patch tokens per predictor."""
        return self._attention_output(patch_tokens, prefix_tokens).maps

    def nonpatch_mass(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention mass (B, K) each predictor puts on keys other than patch tokens (0 when there are none)."""
        out = self._attention_output(patch_tokens, prefix_tokens)
        if out.nonpatch is None:
            return torch.zeros(out.maps.shape[:2], dtype=out.maps.dtype, device=out.maps.device)
        return out.nonpatch

    def predictor_slices(self) -> list[slice | None]:
        """Per predictor, the columns of ``hook_pooled`` it alone produces, or None when it shares them all."""
        return [None] * self.num_predictors

    def feature_mask(self) -> torch.Tensor | None:
        """A (1, width) integer mask giving each pooled column its predictor, for captum's feature ablation.

        None when the predictors do not own disjoint columns.
        """
        slices = self.predictor_slices()
        if not slices or any(s is None for s in slices):
            return None
        mask = torch.full((1, self.width), -1, dtype=torch.long)
        for j, cols in enumerate(slices):
            mask[0, cols] = j
        return mask

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, num_classes={self.num_classes}, width={self.width}, predictors={self.num_predictors}"

    # --- for subclasses --------------------------------------------------------------

    def _pool(self, patch: torch.Tensor, prefix: torch.Tensor | None, uniform: frozenset[int]) -> Pooled:
        raise NotImplementedError

    def _hook_maps(self, attn: torch.Tensor, num_patch: int, extra_first: bool = False) -> tuple[torch.Tensor, Pooled]:
        """Pass attention weights through ``hook_attn`` and rebuild them from its output.

        Args:
            attn: Weights (B, K, L) over L keys: the `num_patch` patch tokens plus L - N others.
            num_patch: Number N of patch keys.
            extra_first: Whether the other keys come before the patch keys.

        Returns:
            The (possibly hook-edited) weights over all L keys, and a Pooled holding the maps
            and non-patch mass (its features field is a placeholder).
        """
        n_extra = attn.shape[-1] - num_patch
        if n_extra == 0:
            maps = self.hook_attn(attn)
            return maps, Pooled(attn, maps, None)
        if extra_first:
            extra, patch = attn[..., :n_extra], attn[..., n_extra:]
        else:
            patch, extra = attn[..., :num_patch], attn[..., num_patch:]
        mass = patch.sum(-1, keepdim=True)
        maps = self.hook_attn(patch / mass.clamp_min(torch.finfo(attn.dtype).tiny))
        patch = maps * mass
        full = torch.cat([extra, patch] if extra_first else [patch, extra], dim=-1)
        return full, Pooled(attn, maps, extra.sum(-1))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        uniform: frozenset[int],
        num_patch: int,
        extra_first: bool = False,
    ) -> tuple[torch.Tensor, Pooled]:
        """Multi-head attention of one query per head, with the heads as predictors.

        Args:
            q: Queries (B or 1, H, 1, d), not yet scaled.
            k: Keys (B, H or 1, L, d).
            v: Values (B, H or 1, L, d_v).
            uniform: Heads whose weights become uniform over the L keys.
            num_patch: How many of the L keys are patch tokens.
            extra_first: Whether the non-patch keys come first.

        Returns:
            The heads' outputs concatenated, shape (B, H * d_v), and a Pooled with the maps.
        """
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, 1, L)
        attn = uniform_rows(scores.squeeze(2).softmax(dim=-1), uniform)
        attn, maps = self._hook_maps(attn, num_patch, extra_first)
        out = (attn.unsqueeze(2) @ v).squeeze(2)  # (B, H, d_v)
        return out.reshape(out.shape[0], -1), maps

    def _attention_output(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None) -> Pooled:
        if self.num_predictors == 0:
            raise ValueError(f"probe '{self.name}' has no attention predictors: attention maps exist only for attentive probes")
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        return self._pool(patch, prefix, frozenset())

    def _grid_for(self, num_tokens: int) -> tuple[int, int]:
        """The patch grid for `num_tokens` tokens: the build option, else the square."""
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != num_tokens:
                raise ValueError(
                    f"probe '{self.name}' was built for a {self.grid[0]}x{self.grid[1]} grid "
                    f"({self.grid[0] * self.grid[1]} tokens) but got {num_tokens} patch tokens"
                )
            return self.grid
        side = int(round(num_tokens**0.5))
        if side * side != num_tokens:
            raise ValueError(
                f"probe '{self.name}' needs the patch grid: {num_tokens} tokens is not a square, so pass grid=(rows, cols) to build()"
            )
        return side, side

    # --- validation ------------------------------------------------------------------

    def _validate(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(patch, torch.Tensor):
            raise TypeError(f"probe '{self.name}': patch tokens must be a torch.Tensor, got {type(patch).__name__}")
        if patch.ndim != 3:
            hint = " (add a batch axis with tokens[None])" if patch.ndim == 2 else ""
            raise ValueError(
                f"probe '{self.name}': patch tokens must have shape (batch, tokens, dim); got shape {tuple(patch.shape)}{hint}"
            )
        if patch.shape[-1] != self.dim:
            raise ValueError(
                f"probe '{self.name}' expects tokens of width D={self.dim} but the patch tokens have D={patch.shape[-1]}"
            )
        if patch.shape[1] == 0:
            raise ValueError(f"probe '{self.name}': got 0 patch tokens")
        if prefix is not None:
            if not isinstance(prefix, torch.Tensor) or prefix.ndim != 3:
                shape = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
                raise ValueError(f"probe '{self.name}': prefix tokens must have shape (batch, prefix, dim); got {shape}")
            if prefix.shape[0] != patch.shape[0]:
                raise ValueError(f"probe '{self.name}': {prefix.shape[0]} prefix token sets for a batch of {patch.shape[0]}")
            if prefix.shape[-1] != self.dim:
                raise ValueError(
                    f"probe '{self.name}' expects tokens of width D={self.dim} but the prefix tokens have D={prefix.shape[-1]}"
                )
            if prefix.shape[1] == 0:
                prefix = None
        if self.needs_prefix and prefix is None:
            raise ValueError(
                f"probe '{self.name}' reads the prefix tokens ([CLS] at index 0) but none were given; "
                "pass prefix_tokens, or use a probe that reads patch tokens only (e.g. 'gap' or 'ep')"
            )
        return patch, prefix

    def _uniform_set(self, uniform: Iterable[int] | int | None) -> frozenset[int]:
        if uniform is None:
            return frozenset()
        if isinstance(uniform, numbers.Integral) or (isinstance(uniform, torch.Tensor) and uniform.ndim == 0):
            uniform = [int(uniform)]
        rows = frozenset(int(j) for j in uniform)
        if rows and self.num_predictors == 0:
            raise ValueError(f"probe '{self.name}' has no attention predictors, so uniform={sorted(rows)} cannot apply")
        bad = sorted(j for j in rows if not 0 <= j < self.num_predictors)
        if bad:
            raise ValueError(
                f"probe '{self.name}' has {self.num_predictors} attention predictors (0..{self.num_predictors - 1}); "
                f"uniform got {bad}"
            )
        return rows


def _as_grid(grid: Sequence[int], name: str) -> tuple[int, int]:
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"probe '{name}': grid must be (rows, cols), got {grid!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"probe '{name}': grid must be positive, got {grid!r}")
    return rows, cols
