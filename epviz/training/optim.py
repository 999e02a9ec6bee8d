"""Optimisers and schedules of probe training: LARS (the reference recipe), AdamW, warm-up + cosine.

Shared by :func:`epviz.fit` (cached tokens) and :func:`epviz.fit_images` (the per-step protocol),
together with the check of their common options.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from epviz.probes import Probe
from epviz.runtime import PRECISIONS

__all__ = ["LARS", "OPTIMIZERS", "check_fit_options", "lr_at", "make_optimizer"]

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
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
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


def lr_at(epoch: float, base_lr: float, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at fractional `epoch`: linear warm-up from 0, then half-cosine to `min_lr`."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup_epochs, span) / span))


def make_optimizer(probe: Probe, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in probe.parameters() if p.requires_grad]
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def check_fit_options(optimizer, precision, epochs, batch_size, warmup_epochs, label_smoothing, early_stopping, val) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if early_stopping is not None:
        if val is None:
            raise ValueError("early_stopping needs validation tokens: pass val=...")
        if int(early_stopping) < 1:
            raise ValueError(f"early_stopping is a patience in epochs and must be >= 1, got {early_stopping}")
