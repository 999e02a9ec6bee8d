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
normalised to sum 1. For self-attention predictors (dinovit) every query row of
head j becomes uniform.

All of this happens in one place, :meth:`Probe._route_attention`, which every
attentive family calls with its raw weights.

Replacement (``forward(..., replace={j: map})``, definition ours) swaps predictor j's
distribution over the patch tokens for a given one, all else unchanged: the ablation
controls (the predictor's mean map, another image's map) use it. It edits the same
tensor as the hook: predictors with non-patch keys keep their non-patch mass and put
``map * patch_mass`` on the patch keys; spatial maps become ``map * sum(w)``. A
self-attention predictor (dinovit) has one distribution per query row, so its
replacement is given per query row, (B, N, N), or as one map for every row.
:meth:`Probe.attention_rows` returns exactly what a replacement replaces, (B, K, R, N)
with R = 1 query row (N for self-attention); ``attention()`` is its mean over rows.

Zeroing (``forward(..., zero=[j])``, sliced probes only) sets predictor j's columns of
the pooled feature to 0 before ``hook_pooled`` and ``norm``.

Evidence (:meth:`Probe.evidence`, eval mode). A probe that is linear after its softmax pools
``pooled = sum_k sum_l a_kl v_kl`` with each predictor's weights a_k summing to 1 over its keys; the
eval-mode BatchNorm is affine and the head linear, so every logit is exactly a sum over predictors and
keys: ``logit_c = sum_k sum_l a_kl w_c . (v_kl - s_k mu) / sigma + b_c``, where s_k is predictor k's share
of the running mean (its own columns for a sliced probe, 1/K of every column otherwise). Families
give their (a, v) through ``_token_values``; the others (a normalisation or an MLP after the pooling)
have no exact form and say so.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from epviz.probes._layers import resolve_heads, uniform_rows

__all__ = [
    "CONTROLS",
    "Evidence",
    "HookPoint",
    "Intervention",
    "MultiHeadProbe",
    "Pooled",
    "Probe",
    "Routed",
    "trainable_params",
]

CONTROLS = ("uniform", "replace", "zero")
"""What :meth:`Probe.ablated_logits` can do to one predictor at a time."""


class HookPoint(nn.Module):
    """An identity module: a named place where hooks can read or edit a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Pooled(NamedTuple):
    """What a probe's pooling stage returns.

    Attributes:
        features: The pooled vector (what :meth:`Probe.pooled` returns), shape (B, width).
        maps: Predictor distributions over the patch tokens, shape (B, K, N), or None when K == 0.
        nonpatch: Attention mass each predictor puts on keys that are not patch tokens,
            shape (B, K), or None when every key is a patch token.
    """

    features: torch.Tensor
    maps: torch.Tensor | None = None
    nonpatch: torch.Tensor | None = None


class Evidence(NamedTuple):
    """Exact contributions to the logits (:meth:`Probe.evidence`): ``logits = patch.sum((-2, -1)) + other.sum(-1) + bias``.

    Attributes:
        patch: (B, C, K, N): what each patch token, through each predictor, adds to each class logit.
        other: (B, C, K): what the keys that are not patch tokens ([CLS], registers) add, through each predictor.
        bias: (C,): the head's bias.
    """

    patch: torch.Tensor
    other: torch.Tensor
    bias: torch.Tensor

    def logits(self) -> torch.Tensor:
        """The logits the contributions sum to, (B, C)."""
        return self.patch.sum((-2, -1)) + self.other.sum(-1) + self.bias


class Routed(NamedTuple):
    """Attention weights after :meth:`Probe._route_attention`.

    Attributes:
        weights: The weights the pooling goes on with, shaped like the input weights
            (uniform rows applied, rebuilt from the hook's output where it is in the path).
        maps: What ``hook_attn`` returned: distributions over the patch tokens, shape (B, K, N).
        nonpatch: Mass (B, K) on keys that are not patch tokens, or None when there are none.
    """

    weights: torch.Tensor
    maps: torch.Tensor
    nonpatch: torch.Tensor | None = None


class Intervention(frozenset):
    """What :meth:`Probe._pool` is asked to change: the uniform predictors (the set's members) and more.

    Families receive it as their ``uniform`` argument and pass it to
    :meth:`Probe._route_attention` unchanged, which applies the replacements and records the rows.
    A plain frozenset (no replacement, no recording) is what a call without them passes.

    Attributes:
        replace: Predictor -> replacement distribution(s) over the patch tokens, (B or 1, R or 1, N).
        record: Whether :meth:`Probe._route_attention` stores the predictors' rows in ``rows``.
        rows: The recorded rows (B, K, R, N), or None.
        applied: Whether :meth:`Probe._route_attention` saw this intervention.
    """

    replace: dict[int, torch.Tensor]
    record: bool
    rows: torch.Tensor | None
    applied: bool

    def __new__(
        cls, uniform: Iterable[int] = (), replace: Mapping[int, torch.Tensor] | None = None, record: bool = False
    ) -> Intervention:
        self = super().__new__(cls, uniform)
        self.replace = dict(replace or {})
        self.record = bool(record)
        self.rows = None
        self.applied = False
        return self


def trainable_params(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Probe(nn.Module):
    """Base class of every probe.

    Subclasses build their pooling modules, call :meth:`_finish` with the pooled width,
    and implement :meth:`_pool` and :attr:`num_predictors`; attentive ones pass their
    raw attention weights through :meth:`_route_attention`.

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

    def has_stacked_form(self) -> bool:
        """Whether :meth:`stacked_logits` computes K stacked heads of this probe in one batched pass."""
        return False

    def stacked_logits(
        self, state: Mapping[str, torch.Tensor], patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits (K, B, C) of K heads like this one whose parameters and buffers are stacked in `state` (name -> (K, ...)).

        Families with a hand-stacked form override it (and :meth:`has_stacked_form`); the training
        engine stacks the others with ``torch.func`` (:class:`~epviz.training.stack.HeadStack`).
        """
        raise NotImplementedError(f"probe '{self.name}' has no hand-stacked form")

    # --- the public verbs ------------------------------------------------------------

    def forward(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        uniform: Iterable[int] | int | None = None,
        *,
        replace: Mapping[int, torch.Tensor] | None = None,
        zero: Iterable[int] | int | None = None,
    ) -> torch.Tensor:
        """Class logits, shape (B, C).

        Args:
            patch_tokens: Patch tokens (B, N, D).
            prefix_tokens: Prefix tokens (B, P, D) ([CLS] at index 0), or None.
            uniform: Predictors whose distributions are replaced by the uniform one.
            replace: Predictor -> the distribution(s) over the patch tokens that replace its own:
                (N,), (B, N), or per query row (B or 1, R or 1, N) (see :meth:`attention_rows`).
            zero: Predictors whose columns of the pooled feature are set to 0 (sliced probes only).
        """
        return self.head(self.norm(self.pooled(patch_tokens, prefix_tokens, uniform, replace=replace, zero=zero)))

    def pooled(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        uniform: Iterable[int] | int | None = None,
        *,
        replace: Mapping[int, torch.Tensor] | None = None,
        zero: Iterable[int] | int | None = None,
    ) -> torch.Tensor:
        """The pooled vector before ``norm`` (what ``hook_pooled`` sees), shape (B, width).

        Args:
            patch_tokens: Patch tokens (B, N, D).
            prefix_tokens: Prefix tokens (B, P, D), or None.
            uniform: Predictors whose distributions are replaced by the uniform one.
            replace: Predictor -> replacement distribution(s), as in :meth:`forward`.
            zero: Predictors whose pooled columns are set to 0, as in :meth:`forward`.
        """
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        rows = self._uniform_set(uniform)
        if replace:
            rows = Intervention(rows, self._replacements(replace, rows, len(patch)))
        out = self._pool(patch, prefix, rows)
        if isinstance(rows, Intervention) and not rows.applied:
            raise RuntimeError(
                f"probe '{self.name}' does not pass its `uniform` argument to _route_attention, so "
                "replace= cannot reach its attention weights"
            )
        features = out.features
        if zero is not None:
            cols = self._zero_columns(self._predictor_set(zero, "zero"))
            if cols is not None:
                features = features.masked_fill(cols.to(features.device), 0.0)
        return self.hook_pooled(features)

    def _token_values(self, patch: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a family linear after its softmax: weights a (B, K, L) and values v (B, K, L, width) with
        ``pooled = sum_k sum_l a_kl v_kl`` and ``sum_l a_kl = 1``, the first N keys the patch tokens. None: no exact form."""
        return None

    def evidence(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> Evidence:
        """Every token's exact contribution to every class logit, per predictor (eval mode; see the module docstring).

        Meant for a few images at a time: the values hold (B, K, L, width) numbers.

        Raises:
            NotImplementedError: The family has no exact form (a normalisation or MLP after its pooling).
            RuntimeError: The probe is in training mode (BatchNorm is affine only with its running statistics).
        """
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        parts = self._token_values(patch, prefix)
        if parts is None:
            raise NotImplementedError(
                f"probe '{self.name}' has no exact per-token evidence: what follows its attention is not linear "
                "(a normalisation or an MLP after the pooling); use an attribution method (captum) for it"
            )
        if self.training:
            raise RuntimeError(f"probe '{self.name}': evidence is exact in eval mode only (call probe.eval() first)")
        weights, values = parts
        k = weights.shape[1]
        owner = self.feature_mask()  # each pooled column's predictor, when the predictors own disjoint columns
        if owner is None:
            share = torch.full((k, self.width), 1.0 / k, dtype=values.dtype, device=values.device)
        else:
            share = torch.nn.functional.one_hot(owner[0], k).T.to(values)
        mean, var = self.norm.running_mean, self.norm.running_var
        assert mean is not None and var is not None  # every probe's BatchNorm tracks running statistics
        normed = (values - share[None, :, None] * mean.to(values.dtype)) * (var + self.norm.eps).rsqrt().to(values.dtype)
        contributions = weights[:, None] * torch.einsum("bklw,cw->bckl", normed, self.head.weight.to(values.dtype))
        n = patch.shape[1]
        return Evidence(contributions[..., :n], contributions[..., n:].sum(-1), self.head.bias.detach())

    def ablated_logits(
        self,
        patch_tokens: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        control: str = "uniform",
        replacement: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full logits and the logits with each predictor ablated in turn.

        This implementation runs one forward per predictor (``self(patch, prefix, uniform=[j])``
        and its likes); families with an exact shortcut override it (see :attr:`fast_ablation`).

        Args:
            patch_tokens: Patch tokens (B, N, D).
            prefix_tokens: Prefix tokens (B, P, D), or None.
            control: ``"uniform"`` (predictor j uniform), ``"replace"`` (predictor j's
                distribution replaced by ``replacement[:, j]``) or ``"zero"`` (predictor j's
                pooled columns set to 0; sliced probes only).
            replacement: For ``"replace"``: every predictor's replacement, (B or 1, K, R or 1, N)
                as :meth:`attention_rows` returns them, or (B or 1, K, N).

        Returns:
            Logits (B, C) and, stacked over the K predictors, the ablated logits (K, B, C).

        Raises:
            ValueError: The probe has no attention predictors, an unknown control, a missing
                replacement, or ``"zero"`` for a probe that is not sliced.
        """
        if self.num_predictors == 0:
            raise ValueError(
                f"probe '{self.name}' has no attention predictors, so there is nothing to ablate; use an attentive probe"
            )
        replacement = self._check_control(control, replacement)
        k = self.num_predictors
        full = self(patch_tokens, prefix_tokens)
        if control == "uniform":
            ablated = [self(patch_tokens, prefix_tokens, uniform=[j]) for j in range(k)]
        elif control == "zero":
            ablated = [self(patch_tokens, prefix_tokens, zero=[j]) for j in range(k)]
        else:
            assert replacement is not None  # _check_control demands one for "replace"
            ablated = [self(patch_tokens, prefix_tokens, replace={j: replacement[:, j]}) for j in range(k)]
        return full, torch.stack(ablated)

    def control_support(self, control: str) -> str | None:
        """None when :meth:`ablated_logits` supports `control`, else the reason it does not.

        Raises:
            ValueError: `control` is not one of :data:`CONTROLS`.
        """
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        if self.num_predictors == 0:
            return f"probe '{self.name}' has no attention predictors"
        if control == "zero" and any(s is None for s in self.predictor_slices()):
            return (
                f"probe '{self.name}' is not sliced: its predictors share every pooled column, so no column "
                "belongs to one predictor alone (zeroing needs predictor_slices())"
            )
        return None

    def attention_rows(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Each predictor's distributions over the N patch tokens, one per query row, shape (B, K, R, N).

        R = 1 for every family whose predictor is one query or one spatial map, R = N for
        self-attention heads (dinovit), whose map (:meth:`attention`) is the mean over the rows.
        This is what ``replace=`` replaces.
        """
        if self.num_predictors == 0:
            raise ValueError(f"probe '{self.name}' has no attention predictors: attention maps exist only for attentive probes")
        patch, prefix = self._validate(patch_tokens, prefix_tokens)
        record = Intervention(record=True)
        self._pool(patch, prefix, record)
        if record.rows is None:
            raise RuntimeError(
                f"probe '{self.name}' does not pass its `uniform` argument to _route_attention, so its "
                "attention rows cannot be recorded"
            )
        return record.rows

    @property
    def fast_ablation(self) -> bool:
        """Whether :meth:`ablated_logits` takes a shortcut that equals the per-predictor loop."""
        return False

    def attention(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention maps (B, K, N): one distribution over the N patch tokens per predictor."""
        maps = self._attention_output(patch_tokens, prefix_tokens).maps
        assert maps is not None  # K > 0 here, and _pool returns maps whenever K > 0
        return maps

    def nonpatch_mass(self, patch_tokens: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention mass (B, K) each predictor puts on keys other than patch tokens (0 when there are none)."""
        out = self._attention_output(patch_tokens, prefix_tokens)
        if out.nonpatch is None:
            assert out.maps is not None  # K > 0 here, and _pool returns maps whenever K > 0
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

    def _route_attention(
        self,
        attn: torch.Tensor,
        uniform: frozenset[int],
        *,
        num_patch: int | None = None,
        extra_first: bool = False,
    ) -> Routed:
        """Apply ``uniform``, pass the maps through ``hook_attn`` and rebuild the weights from its output.

        The shape of `attn` says what kind of predictor it holds:

        - (B, K, L): K distributions over L keys, the `num_patch` patch keys plus L - N others
          (before them when `extra_first`). Uniform rows become 1/L over all keys; the hook
          sees the patch part renormalised to sum 1 and the weights are rebuilt as
          ``map * patch_mass``.
        - (B, H, N, N): self-attention with the H heads as predictors. Uniform makes every
          query row of the head 1/N; the hook observes the mean over query rows and its
          output is not used (the class must set ``attn_hook_in_path = False``).
        - (B, N): one positive spatial map w (not a distribution). The hook sees
          w / sum(w) as a (B, 1, N) map, uniform replaces it by 1/N (w by its mean), and the
          weights are the hook's output times sum(w), shape (B, N).

        Args:
            attn: The raw weights, as above.
            uniform: Predictors to make uniform.
            num_patch: Number N of patch keys among the L keys (default: all of them).
            extra_first: Whether the non-patch keys come before the patch keys.

        Returns:
            The weights to pool with, the maps the hook returned, and the non-patch mass.
        """
        if num_patch is not None and attn.ndim != 3 and num_patch != attn.shape[-1]:
            raise ValueError(
                f"probe '{self.name}': only (B, K, L) weights can have non-patch keys; got shape {tuple(attn.shape)} with num_patch={num_patch}"
            )
        edit = uniform if isinstance(uniform, Intervention) else None
        if edit is not None:
            edit.applied = True
        if attn.ndim == 2:
            total = attn.sum(dim=-1, keepdim=True)
            maps = _replace_rows(uniform_rows((attn / total).unsqueeze(1), uniform), edit, self.name)  # (B, 1, N)
            maps = self.hook_attn(maps)
            _record(edit, maps.unsqueeze(2))
            return Routed(maps.squeeze(1) * total, maps)
        if attn.ndim == 4:
            if self.attn_hook_in_path:
                raise TypeError(
                    f"probe class {type(self).__name__} routes (B, H, N, N) self-attention, whose hook only observes "
                    "the mean over query rows: set the class attribute attn_hook_in_path = False"
                )
            attn = _replace_rows(uniform_rows(attn, uniform), edit, self.name)
            _record(edit, attn)
            return Routed(attn, self.hook_attn(attn.mean(dim=2)))
        if attn.ndim != 3:
            raise ValueError(
                f"probe '{self.name}': attention weights must be (B, K, L), (B, H, N, N) or (B, N); got shape {tuple(attn.shape)}"
            )
        attn = uniform_rows(attn, uniform)
        n_extra = 0 if num_patch is None else attn.shape[-1] - num_patch
        if n_extra == 0:
            maps = self.hook_attn(_replace_rows(attn, edit, self.name))
            _record(edit, maps.unsqueeze(2))
            return Routed(maps, maps)
        if extra_first:
            extra, patch = attn[..., :n_extra], attn[..., n_extra:]
        else:
            patch, extra = attn[..., :num_patch], attn[..., num_patch:]
        mass = patch.sum(-1, keepdim=True)
        maps = self.hook_attn(_replace_rows(patch / mass.clamp_min(torch.finfo(attn.dtype).tiny), edit, self.name))
        _record(edit, maps.unsqueeze(2))
        patch = maps * mass
        full = torch.cat([extra, patch] if extra_first else [patch, extra], dim=-1)
        return Routed(full, maps, extra.sum(-1))

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
        if isinstance(uniform, (int, numbers.Integral)) or (isinstance(uniform, torch.Tensor) and uniform.ndim == 0):
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

    def _predictor_set(self, given: Iterable[int] | int, what: str) -> frozenset[int]:
        if isinstance(given, numbers.Integral) or (isinstance(given, torch.Tensor) and given.ndim == 0):
            given = [int(given)]
        rows = frozenset(int(j) for j in given)  # type: ignore[union-attr]
        if rows and self.num_predictors == 0:
            raise ValueError(f"probe '{self.name}' has no attention predictors, so {what}={sorted(rows)} cannot apply")
        bad = sorted(j for j in rows if not 0 <= j < self.num_predictors)
        if bad:
            raise ValueError(
                f"probe '{self.name}' has {self.num_predictors} attention predictors (0..{self.num_predictors - 1}); "
                f"{what} got {bad}"
            )
        return rows

    def _replacements(self, replace: Mapping[int, torch.Tensor], uniform: frozenset[int], batch: int) -> dict[int, torch.Tensor]:
        """Check `replace` and bring every replacement to (B or 1, R or 1, N)."""
        if not isinstance(replace, Mapping):
            raise TypeError(f"probe '{self.name}': replace must map predictor -> tensor, got {type(replace).__name__}")
        rows = self._predictor_set(replace.keys(), "replace")
        both = sorted(rows & uniform)
        if both:
            raise ValueError(f"probe '{self.name}': predictors {both} are both made uniform and replaced; choose one")
        out = {}
        for j, value in replace.items():
            value = torch.as_tensor(value)
            if value.ndim == 1:
                value = value.view(1, 1, -1)
            elif value.ndim == 2:
                value = value.unsqueeze(1)
            if value.ndim != 3 or value.shape[0] not in (1, batch):
                raise ValueError(
                    f"probe '{self.name}': the replacement of predictor {j} must be (N,), (B, N) or (B or 1, R, N) "
                    f"for a batch of B={batch}; got shape {tuple(torch.as_tensor(replace[j]).shape)}"
                )
            out[int(j)] = value
        return out

    def _check_control(self, control: str, replacement: torch.Tensor | None) -> torch.Tensor | None:
        """Validate a control of :meth:`ablated_logits`; the replacement as (B or 1, K, R or 1, N)."""
        reason = self.control_support(control)
        if reason is not None:
            raise ValueError(f"control '{control}' does not apply: {reason}")
        if control != "replace":
            if replacement is not None:
                raise ValueError(f"control '{control}' takes no replacement; pass control='replace' to replace maps")
            return None
        if replacement is None:
            raise ValueError("control 'replace' needs replacement=: every predictor's map(s), (B or 1, K, R, N)")
        replacement = torch.as_tensor(replacement)
        if replacement.ndim == 3:
            replacement = replacement.unsqueeze(2)
        if replacement.ndim != 4 or replacement.shape[1] != self.num_predictors:
            raise ValueError(
                f"probe '{self.name}': replacement must be (B or 1, K={self.num_predictors}, R, N), "
                f"got shape {tuple(replacement.shape)}"
            )
        return replacement

    def _zero_columns(self, rows: frozenset[int]) -> torch.Tensor | None:
        """A (1, width) boolean mask of the pooled columns the predictors `rows` own, or None when empty."""
        if not rows:
            return None
        reason = self.control_support("zero")
        if reason is not None:
            raise ValueError(f"zero={sorted(rows)} does not apply: {reason}")
        mask = torch.zeros(1, self.width, dtype=torch.bool)
        slices = self.predictor_slices()
        for j in rows:
            mask[0, slices[j]] = True
        return mask


def _replace_rows(attn: torch.Tensor, edit: Intervention | None, name: str) -> torch.Tensor:
    """`attn` (B, K, N) or (B, K, R, N) with the predictors of ``edit.replace`` swapped for their replacements."""
    if edit is None or not edit.replace:
        return attn
    attn = attn.clone()
    rows = 1 if attn.ndim == 3 else attn.shape[2]
    for j, value in edit.replace.items():
        value = value.to(device=attn.device, dtype=attn.dtype)
        if value.shape[-1] != attn.shape[-1] or value.shape[1] not in (1, rows):
            raise ValueError(
                f"probe '{name}': predictor {j} has {rows} row(s) over {attn.shape[-1]} patch tokens, "
                f"its replacement has shape {tuple(value.shape)}"
            )
        attn[:, j] = value[:, 0] if attn.ndim == 3 else value
    return attn


def _record(edit: Intervention | None, rows: torch.Tensor) -> None:
    if edit is not None and edit.record:
        edit.rows = rows


def _as_grid(grid: Sequence[int], name: str) -> tuple[int, int]:
    try:
        rows, cols = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"probe '{name}': grid must be (rows, cols), got {grid!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"probe '{name}': grid must be positive, got {grid!r}")
    return rows, cols


class MultiHeadProbe(Probe):
    """A probe whose K attention predictors are its H heads (the ``heads`` build option).

    Subclasses set :attr:`preferred_heads`, the reference implementation's count: the default
    when it divides ``dim``, else the largest divisor of ``dim`` below it
    (:func:`~epviz.probes._layers.resolve_heads`); an explicit ``heads`` must divide ``dim``.
    Every such family is attentive.
    """

    attentive = True
    preferred_heads: ClassVar[int] = 8

    def __init__(
        self, dim: int, num_classes: int, heads: int | None = None, grid: Sequence[int] | None = None, **options
    ) -> None:
        heads = resolve_heads(int(dim), heads, self.default_heads(int(dim)), self.name)
        super().__init__(dim, num_classes, grid=grid, heads=heads, **options)
        self.heads = heads

    @classmethod
    def default_heads(cls, dim: int) -> int:
        """The head count asked for when none is given (before it is fitted to ``dim``)."""
        return cls.preferred_heads

    @property
    def num_predictors(self) -> int:
        return self.heads
