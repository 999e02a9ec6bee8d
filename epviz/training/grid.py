"""Grids of probe heads trained as one stack (the fair-comparison protocol).

One learning rate for every probe decides which probe wins: probes differ in how fast they
learn. :func:`fit_grid` gives every probe the same *tuning budget* instead, as in DINOv2's
linear evaluation and CAPI: a grid of learning rates x weight decays (x initial seeds), one head per
grid point, all heads trained together as one :class:`~epviz.training.stack.HeadStack` (one forward
and one backward per batch), each head's epoch and the grid point selected on the held-out ``val``
split. The test split never enters: the caller evaluates it once, on :attr:`GridResult.probe` only::

    result = fit_grid("ep16", train, val, lrs=(1e-3, 3e-3, 1e-2, 3e-2), weight_decays=(1e-4,))
    test_top1 = epviz.evaluate.accuracy(result.probe, test)["top1"]

Each grid point reproduces a separate :func:`~epviz.training.fit` with its lr and weight decay
and the same seed: every head starts from the same initial weights (or its seed's), sees the same
batches in the same order, follows the same warm-up + cosine schedule of its own base lr, and keeps
its best epoch on ``val``; the optimiser applies each head's own lr and weight decay. Both run in the
one training loop, :func:`epviz.training.engine.train`, which also owns divergence (a head whose loss
is not finite or exceeds ``DIVERGENCE_FACTOR * ln(C)`` stops, is marked ``diverged`` with a
RuntimeWarning and is never selected; the others go on), early stopping, checkpoints and the
distributed protocol (:mod:`epviz.training.distributed_fit`).

A grid larger than memory allows (:func:`head_bytes`, against half the free memory) trains as several
stacks one after the other, each on the same batches, with the estimate printed.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from epviz.checks import check_int
from epviz.distributed import is_main
from epviz.errors import ConfigError
from epviz.probes import Probe, accepted_options, build
from epviz.runtime import autocast, resolve_device, resolve_precision
from epviz.setting import check_grid_values
from epviz.tokens import TokenSet
from epviz.tokens.storage import format_bytes
from epviz.training import engine
from epviz.training.distributed_fit import check_world
from epviz.training.engine import DIVERGENCE_FACTOR, Recipe
from epviz.training.fit import TokenBatches, check_training_data, protocol_of, run_facts
from epviz.training.optim import check_fit_options
from epviz.training.stack import HeadStack

__all__ = ["DIVERGENCE_FACTOR", "GridResult", "fit_grid", "free_memory", "head_bytes", "select_point"]

PROTOCOL = "cached tokens (one backbone pass, no augmentation); heads trained together on one read per batch"
SELECT_ON = "val"

HISTORY_COLUMNS = ["point", "lr", "weight_decay", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
POINT_COLUMNS = ["point", "lr", "weight_decay", "best_epoch", "best_val_acc", "final_val_acc", "epochs_run", "diverged"]


@dataclass
class GridResult:
    """The outcome of :func:`fit_grid`.

    Attributes:
        probe: The selected head holding its best epoch's weights, in eval mode.
        best: The selected row of `points` (its name is the grid point's index).
        points: One row per grid point: point, lr, weight_decay, best_epoch (1-based; <NA> when
            diverged), best_val_acc, final_val_acc (NaN when diverged), epochs_run, diverged.
        history: One row per grid point x epoch run: point, lr, weight_decay, epoch, train_loss,
            train_acc (running means over the epoch's steps), val_loss, val_acc. The epoch in
            which a point diverged has NaN losses and accuracies.
        seconds: Wall time of the whole grid.
        config: Grid and fit options, the probe's build options and the data sizes.
        probes: Every head with its best weights (eval mode), indexed by ``point``, when
            ``fit_grid(..., keep_all=True)``; else None.
        select_on: The split the selection used; always "val" (fit_grid never sees a test split).
    """

    probe: Probe
    best: pd.Series
    points: pd.DataFrame
    history: pd.DataFrame
    seconds: float
    config: dict = field(default_factory=dict)
    probes: list[Probe] | None = None
    select_on: str = SELECT_ON


def select_point(points: pd.DataFrame) -> pd.Series:
    """The grid point to keep: the highest ``best_val_acc``; ties go to the smaller lr, then the smaller weight decay.

    Diverged points (NaN ``best_val_acc``) are never selected. With a ``seed`` column the (lr, weight decay)
    with the best mean over its seeds wins (a diverged seed rules its pair out), and its first seed's row is returned.

    Args:
        points: A `points` table of :class:`GridResult`.

    Raises:
        FloatingPointError: Every point diverged.
    """
    if "seed" in points.columns:
        pairs = points.groupby(["lr", "weight_decay"], sort=False)["best_val_acc"].agg(lambda acc: acc.mean(skipna=False))
        chosen = select_point(pairs.reset_index().assign(point=range(len(pairs))))
        rows = points[(points["lr"] == chosen["lr"]) & (points["weight_decay"] == chosen["weight_decay"])]
        return rows.sort_values("seed").iloc[0]
    ok = points[points["best_val_acc"].notna()]
    if ok.empty:
        lrs = ", ".join(f"{lr:g}" for lr in sorted(set(points["lr"])))
        raise FloatingPointError(f"every grid point diverged (lrs {lrs}): lower the learning rates, or use precision='fp32'")
    order = ok.assign(_neg=-ok["best_val_acc"]).sort_values(["_neg", "lr", "weight_decay"], kind="stable")
    return points.loc[order.index[0]]


def fit_grid(
    probe: str | Probe | Callable[[], Probe],
    train: TokenSet,
    val: TokenSet,
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float] = (1e-4,),
    seeds: Sequence[int] | None = None,
    epochs: int = 15,
    batch_size: int = 256,
    optimizer: str = "adamw",
    warmup_epochs: float = 2,
    label_smoothing: float = 0.0,
    early_stopping: int | None = None,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    seed: int = 0,
    keep_all: bool = False,
    progress: bool = True,
    stacking: str = "auto",
    max_heads: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    halving: int | None = None,
    **build_options,
) -> GridResult:
    """Train one head per (lr, weight decay[, initial seed]) grid point as one stack, and select the point on `val`.

    Args:
        probe: A registered probe name (built for the tokens with ``seed`` and `build_options`),
            a freshly built probe, or a function returning one. Every head starts as a copy of it.
        train: Training tokens.
        val: Validation tokens: each head's best epoch and the grid point are selected on them.
        lrs: Peak learning rates of the grid.
        weight_decays: Weight decays of the grid (on parameters with ndim > 1 only).
        seeds: Initial-weight seeds, a third grid axis (the probe given by name only); the shuffling
            stays `seed`'s, so the heads of one (lr, weight decay) differ only in their initial weights.
            With seeds the tables get a ``seed`` column and the selection averages each (lr, weight decay)
            over its seeds (:func:`select_point`).
        epochs: Maximum number of epochs.
        batch_size: Samples per step (the global batch in a distributed run: a multiple of the number
            of processes); incomplete last batches are dropped when the set holds more than one batch
            (as in :func:`~epviz.training.fit`).
        optimizer: "adamw", "lars" or "sgd".
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        label_smoothing: Cross-entropy label smoothing.
        early_stopping: Stop a head after this many epochs without a validation improvement.
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 where the device computes it natively, else fp32).
        device: Where to train; None picks CUDA when available.
        seed: Seed of the shuffling order (and of the initial weights when `probe` is a name and
            `seeds` is not given), an integer >= 0.
        keep_all: Also return every head (:attr:`GridResult.probes`); costs one probe per point.
        progress: Show a tqdm bar over epochs.
        stacking: How the stack runs its forward pass (:data:`~epviz.training.stack.MODES`; "auto": the
            family's hand-stacked form, else vmap on CUDA and a loop on CPU).
        max_heads: At most this many heads in one stack; None: as many as half the free memory holds
            (:func:`head_bytes`); a larger grid trains in chunks, one after the other, with the same batches.
        checkpoint: A file to write each stack's state to after every epoch and resume from.
        halving: Successive halving with this eta (an integer >= 2): at the rungs of
            :func:`~epviz.training.engine.halving_rungs` only the best 1/eta of the heads still training
            (by best val top-1 so far) go on; the others stop with their best epoch and get their rung in
            a ``halved`` column. None (default): every head trains the whole budget. Chunked grids halve
            within each chunk.
        **build_options: Build options of the probe when `probe` is a name (``num_queries``, ...).

    Raises:
        ValueError: An empty grid, a non-positive or non-finite lr, a negative weight decay, a bool
            where a number is expected, a repeated grid point, bad fit options or tokens that do not fit
            the probe; in a distributed run, a `batch_size` that is not a multiple of the number of
            processes, or ranks given different options or data (ConfigError); one head needing more
            memory than there is (ConfigError, with the estimate).
        FloatingPointError: Every grid point diverged.
    """
    lrs, weight_decays, pairs = _grid_points(lrs, weight_decays)
    check_fit_options(optimizer, precision, epochs, batch_size, warmup_epochs, label_smoothing, early_stopping, val)
    check_int("seed", seed, 0)
    seed_axis = seeds is not None
    seeds = _check_seeds(seeds, seed, probe)
    points = [(lr, wd, s) for lr, wd in pairs for s in seeds]
    if max_heads is not None:
        check_int("max_heads", max_heads, 1)
    if halving is not None:
        check_int("halving (eta, the share 1/eta of heads kept at each rung)", halving, 2)
    if val is None:
        raise ValueError("fit_grid selects its grid point on held-out tokens: pass val=... (never the test split)")
    templates = {s: _template(probe, train, val, s, build_options) for s in seeds}
    template = templates[seeds[0]]
    check_training_data(template, train, val, "fit_grid")
    world = check_world(
        batch_size,
        len(train),
        1,
        "fit_grid",
        dict(
            points=points,
            recipe=(epochs, batch_size, optimizer, warmup_epochs, label_smoothing, early_stopping, precision, seed),
            sizes=(len(train), len(val)),
            probe=dict(template.config),
        ),
    )

    device = resolve_device(device)
    precision = resolve_precision(device, precision)  # "auto": bf16 only where the device computes it natively
    k = len(points)
    size = max_heads or _heads_that_fit(template, train, batch_size, device, precision, k, progress)
    recipe = Recipe(epochs, optimizer, warmup_epochs, label_smoothing, early_stopping, precision, halving)
    heads: list[Probe] = []
    rows: list[dict] = []
    best_epoch, best_acc, whys, epochs_run, halved = [], [], [], [], []
    start = time.perf_counter()
    for first in range(0, k, size):
        chunk = points[first : first + size]
        path = None if checkpoint is None else (checkpoint if size >= k else f"{checkpoint}.{first // size}")
        stack = HeadStack([templates[s] for _, _, s in chunk], device, stacking)
        trained = engine.train(
            stack,
            TokenBatches(train, val, batch_size, seed, device),
            recipe,
            [lr for lr, _, _ in chunk],
            [wd for _, wd, _ in chunk],
            device=device,
            desc=f"fit_grid {template.name}",
            progress=progress,
            checkpoint=path,
            identity=dict(
                recipe=recipe,
                points=chunk,
                seed=seed,
                batch_size=batch_size,
                probe=template.config,
                train=len(train),
                val=len(val),
            ),
        )
        heads += trained.heads
        rows += [dict(row, head=row["head"] + first) for row in trained.history]
        best_epoch += trained.best_epoch
        best_acc += trained.best_acc
        whys += trained.diverged
        epochs_run += trained.epochs_run
        halved += trained.halved
    for i, why in enumerate(whys):
        if why is not None and is_main():
            lr, wd, s = points[i]
            warnings.warn(
                f"grid point {i} (lr {lr:g}, weight decay {wd:g}{f', seed {s}' if seed_axis else ''}) diverged: {why}; it is "
                f"marked diverged and never selected (lower its lr{', or use precision=fp32' if precision != 'fp32' else ''})",
                RuntimeWarning,
                stacklevel=2,
            )

    extra = ["seed"] if seed_axis else []
    history = pd.DataFrame(
        [
            dict(
                point=r["head"],
                lr=points[r["head"]][0],
                weight_decay=points[r["head"]][1],
                **({"seed": points[r["head"]][2]} if seed_axis else {}),
                **{c: r[c] for c in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")},
            )
            for r in rows
        ],
        columns=HISTORY_COLUMNS[:3] + extra + HISTORY_COLUMNS[3:],
    ).sort_values(["point", "epoch"], ignore_index=True)
    final = history.groupby("point")["val_acc"].last()
    diverged = [w is not None for w in whys]
    table = pd.DataFrame(
        dict(
            point=range(k),
            lr=[p[0] for p in points],
            weight_decay=[p[1] for p in points],
            **({"seed": [p[2] for p in points]} if seed_axis else {}),
            best_epoch=pd.array([None if d else e for e, d in zip(best_epoch, diverged)], dtype="Int64"),
            best_val_acc=[math.nan if d else a for a, d in zip(best_acc, diverged)],
            final_val_acc=[math.nan if d else float(final.get(i, math.nan)) for i, d in enumerate(diverged)],
            epochs_run=epochs_run,
            diverged=diverged,
            halved=halved,
        ),
        columns=POINT_COLUMNS[:3] + extra + POINT_COLUMNS[3:] + (["halved"] if halving else []),
    )
    best = select_point(table)
    config = dict(
        protocol=PROTOCOL if train.views == 1 else protocol_of(train) + "; heads trained together on one read per batch",
        select_on=SELECT_ON,
        lrs=lrs,
        weight_decays=weight_decays,
        **recipe.options(),
        batch_size=batch_size,
        **run_facts(device, seed, train, val),
        val_origin=val.origin.as_dict(),
        probe=dict(template.config),
        stacking=stack.mode,  # the engine runs distributed stacks as a loop
        heads_per_stack=min(size, k),
    )
    if seed_axis:
        config["seeds"] = list(seeds)
    if world > 1:
        config["world_size"] = world
    return GridResult(
        probe=heads[int(best["point"])],
        best=best,
        points=table,
        history=history,
        seconds=time.perf_counter() - start,
        config=config,
        probes=heads if keep_all else None,
    )


def head_bytes(template: Probe, train: TokenSet, batch_size: int, device: torch.device, precision: str) -> int:
    """Bytes one head adds to a stack: weights, gradient, two optimiser moments and the best copy (5 x the
    parameters), plus the activations backward keeps for one batch, measured with saved-tensor hooks on one
    forward pass of a copy of the head."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    batch = train.batch(np.arange(min(batch_size, len(train))), device=device)
    probe = copy.deepcopy(template).to(device).train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(device, precision):
        probe(batch.patch, batch.prefix)
    weights = sum(p.numel() * p.element_size() for p in template.parameters())
    return 5 * weights + saved


def free_memory(device: torch.device) -> int:
    """Bytes free for training on `device`: CUDA's free memory, else the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _heads_that_fit(
    template: Probe, train: TokenSet, batch_size: int, device: torch.device, precision: str, k: int, progress: bool
) -> int:
    """How many heads one stack may hold: half the free memory over :func:`head_bytes`; the estimate is printed when the grid is cut."""
    need, budget = head_bytes(template, train, batch_size, device, precision), free_memory(device) // 2
    if need > budget:
        raise ConfigError(
            f"one {template.name} head needs about {format_bytes(need)} at batch_size={batch_size} (weights, optimiser "
            f"state and activations) but only {format_bytes(budget)} (half the free memory) is available: lower batch_size"
        )
    size = max(1, min(k, budget // need))
    if size < k and is_main():
        print(
            f"fit_grid: {k} heads x {format_bytes(need)} each > {format_bytes(budget)} (half the free memory on {device}): "
            f"training {-(-k // size)} stacks of at most {size} heads",
            file=sys.stderr,
        )
    return size


def _check_seeds(seeds: Sequence[int] | None, seed: int, probe) -> list[int]:
    if seeds is None:
        return [seed]
    if not isinstance(probe, str):
        raise ConfigError("seeds=... seeds the initial weights, so the probe must be given by name (e.g. 'ep16')")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not len(seeds):
        raise ConfigError(f"seeds must be a non-empty sequence of integers >= 0, got {seeds!r}")
    values = [check_int("seeds", s, 0) for s in seeds]
    if len(set(values)) != len(values):
        raise ConfigError(f"seeds holds a repeated value: {list(seeds)}; pass each seed once")
    return values


# --- helpers ---------------------------------------------------------------------------


def _grid_points(
    lrs: Sequence[float], weight_decays: Sequence[float]
) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """The checked grid values as floats, and the grid points (lr, weight decay), lr-major."""
    lr_values, wd_values = check_grid_values(lrs, weight_decays)
    return list(lr_values), list(wd_values), list(itertools.product(lr_values, wd_values))


def _template(probe: str | Probe | Callable[[], Probe], train: TokenSet, val: TokenSet, seed: int, options: dict) -> Probe:
    if {"lr", "weight_decay"} & set(options):
        raise ValueError(
            "fit_grid takes grids, not single values: pass lrs=(...) and weight_decays=(...) instead of lr / weight_decay"
        )
    if isinstance(probe, str):
        if "grid" not in options and "grid" in accepted_options(probe):
            options = {**options, "grid": train.grid}
        num_classes = max(int(s.num_classes or 0) for s in (train, val))
        return build(probe, train.dim, num_classes, seed=seed, **options)
    if options:
        raise ValueError(
            f"build options {sorted(options)} apply only when the probe is given by name; build the probe with them instead"
        )
    if isinstance(probe, Probe):
        return probe
    if callable(probe):
        built = probe()
        if isinstance(built, Probe):
            return built
        raise TypeError(f"the probe factory must return a Probe (see epviz.probes.build), got {type(built).__name__}")
    raise TypeError(f"fit_grid expects a probe name, a Probe or a function returning one, got {type(probe).__name__}")
