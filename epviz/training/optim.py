"""Optimisers and schedules of probe training: LARS (the reference recipe), AdamW, SGD, warm-up + cosine.

The optimisers update K heads stacked on a leading axis (:class:`~epviz.training.stack.HeadStack`),
each with its own learning rate and weight decay; the training engine (:mod:`epviz.training.engine`)
is their one user, together with the check of the training options.
"""

from __future__ import annotations

import math

import torch

from epviz.checks import check_int, check_number, non_negative, positive
from epviz.errors import ConfigError
from epviz.runtime import PRECISIONS

__all__ = [
    "LARS",
    "SGD",
    "AdamW",
    "OPTIMIZERS",
    "StackedOptimizer",
    "check_fit_options",
    "default_warmup",
    "lr_at",
    "make_optimizer",
]


class StackedOptimizer:
    """An optimiser over K heads whose parameters are stacked on a leading K axis, each head with its own lr and weight decay.

    One step updates every head as its own optimiser would: per-head learning rates and weight decays
    are (K,) vectors broadcast over each parameter's K axis (a scaled gradient would not do this for
    Adam, whose step does not scale with the gradient), LARS trust ratios use each head's own norms,
    and weight decay applies to parameters with more than one dimension per head (``ndim > 2`` stacked),
    as in the single-head recipe. Parameters without a gradient are left alone, state included.

    Args:
        params: Name -> stacked parameter (K, ...).
        lr: Peak learning rate of each head, shape (K,) (the schedule's factor multiplies it each step).
        weight_decay: Weight decay of each head, shape (K,).
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        self.params = params
        self.lr = lr.double()
        self.weight_decay = weight_decay.double()
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps: dict[str, int] = {}

    @torch.no_grad()
    def step(self, factor: float, active: torch.Tensor | None = None) -> None:
        """One update at ``factor * lr`` per head; heads where `active` is False keep their weights and state."""
        frozen = None if active is None or bool(active.all()) else ~active
        kept = None if frozen is None else self._rows(frozen)
        for name, p in self.params.items():
            if p.grad is None:
                continue
            self.steps[name] = self.steps.get(name, 0) + 1
            lr = _per_head(self.lr * factor, p)
            decay = _per_head(self.weight_decay, p) if p.ndim > 2 else None
            self._update(name, p, p.grad, lr, decay, self.state.setdefault(name, {}))
        if frozen is not None and kept is not None:
            self._restore(frozen, kept)

    def keep(self, params: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Follow a stack that kept only the heads `index` (its new parameter tensors are `params`)."""
        self.params = params
        self.lr, self.weight_decay = self.lr[index.cpu()], self.weight_decay[index.cpu()]
        self.state = {name: {k: v[index.to(v.device)] for k, v in state.items()} for name, state in self.state.items()}

    def state_dict(self) -> dict:
        """Steps and moments (tensors and integers only: reloadable with ``weights_only=True``)."""
        return dict(steps=dict(self.steps), state=self.state, lr=self.lr, weight_decay=self.weight_decay)

    def load_state_dict(self, saved: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = {str(k): int(v) for k, v in saved["steps"].items()}
        self.state = {name: dict(state) for name, state in saved["state"].items()}
        self.lr, self.weight_decay = saved["lr"], saved["weight_decay"]

    def _update(self, name, p, grad, lr, decay, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        kept = {f"p:{n}": p[rows].clone() for n, p in self.params.items()}
        kept.update({f"s:{n}:{k}": v[rows].clone() for n, st in self.state.items() for k, v in st.items()})
        return kept

    def _restore(self, rows: torch.Tensor, kept: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p[rows] = kept[f"p:{n}"]
        for n, st in self.state.items():
            for k, v in st.items():
                if f"s:{n}:{k}" in kept:
                    v[rows] = kept[f"s:{n}:{k}"]


class AdamW(StackedOptimizer):
    """AdamW (betas 0.9, 0.999; eps 1e-8; decoupled weight decay), the update of ``torch.optim.AdamW`` per head."""

    betas = (0.9, 0.999)
    eps = 1e-8

    def _update(self, name, p, grad, lr, decay, state) -> None:
        b1, b2 = self.betas
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if decay is not None:
            p.mul_(1 - (lr * decay).to(p.dtype))
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.steps[name]
        step_size = (lr / (1 - b1**t)).to(p.dtype)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
        p.addcdiv_(m * step_size, denom, value=-1.0)


class LARS(StackedOptimizer):
    """SGD with momentum 0.9 and layer-wise trust ratios (trust coefficient 0.001), per head.

    Parameters with more than one dimension per head get their update (gradient plus weight decay)
    rescaled by ``0.001 * ||p|| / ||update||``, the norms taken over each head's own slice; biases
    and other 1-D parameters get neither the rescaling nor weight decay.
    """

    momentum = 0.9
    trust_coefficient = 0.001

    def _update(self, name, p, grad, lr, decay, state) -> None:
        update = grad
        if decay is not None:
            update = grad + decay.to(p.dtype) * p
            p_norm = _per_head(torch.linalg.vector_norm(p.flatten(1), dim=1), p)
            u_norm = _per_head(torch.linalg.vector_norm(update.flatten(1), dim=1), p)
            ratio = torch.where((p_norm > 0) & (u_norm > 0), self.trust_coefficient * p_norm / u_norm, torch.ones_like(p_norm))
            update = update * ratio
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        state["mu"].mul_(self.momentum).add_(update)
        p.sub_(state["mu"] * lr.to(p.dtype))


class SGD(StackedOptimizer):
    """SGD with momentum 0.9 and L2 weight decay added to the gradient, the update of ``torch.optim.SGD`` per head."""

    momentum = 0.9

    def _update(self, name, p, grad, lr, decay, state) -> None:
        update = grad if decay is None else grad + decay.to(p.dtype) * p
        if "mu" not in state:
            state["mu"] = update.clone()
        else:
            state["mu"].mul_(self.momentum).add_(update)
        p.sub_(state["mu"] * lr.to(p.dtype))


def _per_head(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) vector shaped to broadcast over a stacked tensor (K, ...)."""
    return values.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def default_warmup(epochs: float) -> float:
    """The default warm-up: the reference's ratio (10 of 90 epochs), at most 10 epochs: ``min(10, epochs / 9)``."""
    try:
        return min(10.0, float(epochs) / 9.0)
    except (TypeError, ValueError):
        return 10.0  # the epochs check reports the bad value


def lr_at(epoch: float, base_lr: float, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at fractional `epoch`: linear warm-up from 0, then half-cosine to `min_lr`."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup_epochs, span) / span))


def make_optimizer(name: str, params: dict[str, torch.Tensor], lrs, weight_decays) -> StackedOptimizer:
    """The optimiser `name` over stacked parameters, one lr and weight decay per head.

    Raises:
        ConfigError: Unknown `name`, an lr not > 0 or a negative weight decay.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    for lr in lrs:
        positive("lr", lr)
    for wd in weight_decays:
        non_negative("weight_decay", wd)
    return OPTIMIZERS[name](
        params, torch.as_tensor(list(lrs), dtype=torch.float64), torch.as_tensor(list(weight_decays), dtype=torch.float64)
    )


OPTIMIZERS: dict[str, type[StackedOptimizer]] = {"lars": LARS, "adamw": AdamW, "sgd": SGD}


def check_fit_options(
    optimizer,
    precision,
    epochs,
    batch_size,
    warmup_epochs,
    label_smoothing,
    early_stopping,
    val,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
) -> None:
    """Refuse out-of-range training options before anything runs, naming the option and its valid range.

    Args:
        optimizer: One of :data:`OPTIMIZERS` ("lars", "adamw", "sgd").
        precision: One of ``PRECISIONS``.
        epochs: An integer >= 1.
        batch_size: An integer >= 1.
        warmup_epochs: A number in [0, epochs]: a warm-up longer than the run would never reach the peak lr.
        label_smoothing: A number in [0, 1).
        early_stopping: None, or a patience (integer >= 1) that needs `val`.
        val: The validation data (or None).
        lr: None (the default for the optimiser) or a finite number > 0; a negative lr would run gradient ascent.
        weight_decay: A finite number >= 0.

    Raises:
        ConfigError: An option is out of range.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    epochs = check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1)
    warmup = non_negative("warmup_epochs", warmup_epochs)
    if warmup > epochs:
        raise ConfigError(
            f"warmup_epochs={warmup_epochs} is longer than the run (epochs={epochs}), so the learning rate would never "
            f"reach its peak: pass warmup_epochs between 0 and {epochs} (e.g. warmup_epochs={max(epochs // 10, 0)})"
        )
    check_number("label_smoothing", label_smoothing, 0, 1, open_high=True)
    if lr is not None:
        positive("lr", lr)
    non_negative("weight_decay", weight_decay)
    if early_stopping is not None:
        if val is None:
            raise ConfigError("early_stopping needs validation tokens: pass val=...")
        check_int("early_stopping (a patience in epochs)", early_stopping, 1)
