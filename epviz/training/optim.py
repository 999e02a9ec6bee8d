"""Optimisers and schedules of probe training: LARS (the reference recipe), AdamW, warm-up + cosine.

Shared by :func:`epviz.fit` (cached tokens) and :func:`epviz.fit_images` (the per-step protocol),
together with the check of their common options.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from epviz.checks import check_int, check_number, non_negative, positive
from epviz.errors import ConfigError
from epviz.probes import Probe
from epviz.runtime import PRECISIONS

__all__ = ["LARS", "OPTIMIZERS", "check_fit_options", "default_warmup", "lr_at", "make_optimizer"]

OPTIMIZERS = ("lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (LARS).

    Parameters with more than one dimension get their update (gradient plus weight
    decay) rescaled by ``trust_coefficient * ||p|| / ||update||``; biases and other
    1-D parameters get neither the rescaling nor weight decay.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        weight_decay: L2 penalty, applied only to parameters with ndim > 1.
        momentum: Momentum factor.
        trust_coefficient: LARS trust coefficient.

    Raises:
        ConfigError: lr or weight_decay negative, momentum outside [0, 1), trust_coefficient not > 0.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        non_negative("lr", lr)
        non_negative("weight_decay", weight_decay)
        check_number("momentum", momentum, 0, 1, open_high=True)
        positive("trust_coefficient", trust_coefficient)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where(
                        (p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm)
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


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


def make_optimizer(probe: Probe, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser `name` over the probe's trainable parameters (weight decay on ndim > 1 only).

    Raises:
        ConfigError: Unknown `name`, lr not > 0 or weight_decay negative.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    positive("lr", lr)
    non_negative("weight_decay", weight_decay)
    params = [p for p in probe.parameters() if p.requires_grad]
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


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
        optimizer: One of :data:`OPTIMIZERS`.
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
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
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
