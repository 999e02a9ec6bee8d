"""Tuned probes: a grid of learning rates x weight decays per probe, selected on held-out ``val``.

The notebooks never compare probes at one shared learning rate. Each probe gets the same
*tuning budget* (a grid), trained with :func:`~epviz.training.grid.fit_grid` on one read of the
tokens, and the grid point with the best validation top-1 is kept. To keep the cost of a full
run bounded, the grid may be trained on a class-balanced subset of the training tokens
(``train_size``); the chosen (lr, weight decay) is then refit on the whole training set, from the
same initial weights, with the same budget (selection on a subset, reported number from the
refit). The test split is never seen here.

A grid is written as a mapping, e.g. ``{"lrs": (1e-3, 3e-3, 1e-2, 3e-2), "weight_decays": (1e-4,),
"train_size": 4000}``; :func:`epviz.training.probe_cache.fit_or_load` dispatches to :func:`tune` when
its options hold ``grid=...``, so the probe zoo, layer sweeps and low-shot runs all tune the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from epviz.checks import check_int
from epviz.data.splits import balanced_subset
from epviz.errors import ConfigError
from epviz.probes import Probe
from epviz.setting import check_grid
from epviz.tokens import TokenSet
from epviz.training.fit import FitResult, fit
from epviz.training.grid import fit_grid

__all__ = ["tune"]


def tune(
    probe: Probe,
    train: TokenSet,
    val: TokenSet,
    *,
    grid: Mapping[str, Any],
    seed: int = 0,
    device: str | torch.device | None = None,
    **fit_options: Any,
) -> FitResult:
    """Train `probe` once per grid point, keep the point with the best val top-1 (refit at full size if selected on a subset).

    Args:
        probe: A freshly built probe (its initial weights are every grid point's, and the refit's).
        train: Training tokens.
        val: Validation tokens: epoch and grid-point selection.
        grid: ``lrs``, ``weight_decays`` and optionally ``train_size`` (see the module docstring).
        seed: Seed of the shuffling (and of the subset).
        device: Where to train.
        **fit_options: The rest of the budget (epochs, batch_size, optimizer, warmup_epochs, precision, ...);
            ``lr`` and ``weight_decay`` come from the grid.

    Returns:
        The chosen run as a :class:`FitResult` (its ``config`` holds ``lr`` / ``weight_decay`` chosen and
        ``grid``: the grid, the points table and every point's validation curve; see
        :attr:`FitResult.grid_points` and :attr:`FitResult.grid_history`).
    """
    spec = check_grid(grid)
    check_int("seed", seed, 0)  # before it draws the subset
    clashing = sorted({"lr", "weight_decay"} & set(fit_options))
    if clashing:
        raise ConfigError(f"{clashing} cannot be given with a grid: the grid's lrs / weight_decays replace them")
    options = {k: v for k, v in fit_options.items() if k != "progress"}
    subset = spec["train_size"] is not None and spec["train_size"] < len(train)
    selection = train.subset(balanced_subset(train.labels, spec["train_size"], seed)) if subset else train
    initial = copy.deepcopy(probe)
    result = fit_grid(
        probe,
        selection,
        val,
        lrs=spec["lrs"],
        weight_decays=spec["weight_decays"],
        seed=seed,
        device=device,
        progress=False,
        **options,
    )
    chosen = result.best
    lr, wd = float(chosen["lr"]), float(chosen["weight_decay"])
    record = {
        **spec,
        "selected_on": f"val ({len(val)} images), grid trained on {len(selection)} of {len(train)} train images",
        "points": _records(result.points),
        "history": _records(result.history),
        "chosen": {"point": int(chosen["point"]), "lr": lr, "weight_decay": wd},
        "seconds": result.seconds,
    }
    if subset:
        refit = fit(initial, train, val, lr=lr, weight_decay=wd, seed=seed, device=device, progress=False, **options)
        refit.config["grid"] = record
        refit.seconds += result.seconds
        return refit
    history = result.history[result.history["point"] == chosen["point"]].drop(columns=["point", "lr", "weight_decay"])
    config = {**result.config, **options, "lr": lr, "weight_decay": wd, "seed": seed, "grid": record}
    return FitResult(
        probe=result.probe,
        history=history.reset_index(drop=True),
        best_epoch=int(chosen["best_epoch"]),
        best_acc=float(chosen["best_val_acc"]),
        final_acc=float(chosen["final_val_acc"]),
        seconds=result.seconds,
        config=config,
    )


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in table.to_dict("records")]
