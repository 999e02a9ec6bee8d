"""Grids of probe heads trained together on one read of the tokens (the fair-comparison protocol).

One learning rate for every probe decides which probe wins: probes differ in how fast they
learn. :func:`fit_grid` gives every probe the same *tuning budget* instead, as in DINOv2's
linear evaluation and CAPI: a grid of learning rates x weight decays, one head per grid point,
all heads trained together on one pass over the training tokens, each head's epoch and the
grid point selected on the held-out ``val`` split. The test split never enters: the caller
evaluates it once, on :attr:`GridResult.probe` only::

    result = fit_grid("ep16", train, val, lrs=(1e-3, 3e-3, 1e-2, 3e-2), weight_decays=(1e-4,))
    test_top1 = epviz.evaluate.accuracy(result.probe, test)["top1"]

Each grid point reproduces a separate :func:`~epviz.training.fit` with its lr and weight decay
and the same seed: every head starts from the same initial weights, sees the same batches in the
same order, follows the same warm-up + cosine schedule of its own base lr, and keeps its best
epoch on ``val``. The heads share no parameter, and one optimiser holds them all with the
parameter groups :func:`~epviz.training.optim.make_optimizer` gives each head (each group
following its own head's schedule), so one step of it is the step each separate fit would take.

What is shared is the cost of the data: each batch is gathered, converted to fp32 and moved
to the device once for all heads, and so is each validation batch.

Under ``torchrun`` (a process group of W > 1 processes) the grid trains data-parallel and gives
the result of one process, as :func:`~epviz.training.fit` does: `batch_size` is the global batch,
each rank takes its contiguous 1/W slice of every global batch, the heads' BatchNorm layers use the
global batch's statistics, validation is sharded and all-reduced. The heads are trained one at a
time (forward then backward, so that only one head's activations are alive), which does not fit
``DistributedDataParallel``'s one forward, one backward per step; so after the heads' backward passes
every head's gradients are averaged over the ranks in one all-reduce, the average DDP would take.
Training losses (and so divergence) are those of the global batch, so every rank stops, marks and
selects the same heads.

A head diverges when a training loss is not finite or exceeds ``DIVERGENCE_FACTOR * ln(C)``
(a hundred times the loss of a uniform guess over the C classes), or when its validation loss
is not finite, the rule :func:`~epviz.training.fit` applies too (:func:`~epviz.training.fit.divergence`).
It then stops training, its epoch gets NaN losses and accuracies, the point is marked ``diverged``
(with a RuntimeWarning) and is never selected; the other heads go on.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from epviz.checks import check_int
from epviz.distributed import all_reduce_sum, check_same, is_distributed, is_main, rank, world_size
from epviz.evaluate import iter_batches
from epviz.probes import Probe, accepted_options, build
from epviz.runtime import autocast, resolve_device
from epviz.setting import check_grid_values
from epviz.tokens import TokenSet
from epviz.training.distributed_fit import (
    average_gradients,
    broadcast_module,
    check_world,
    epoch_batches,
    global_sums,
    part_bounds,
    slice_weight,
    synced_batchnorm,
)
from epviz.training.fit import DIVERGENCE_FACTOR, check_training_data, divergence, protocol_of
from epviz.training.optim import check_fit_options, lr_at, make_optimizer

__all__ = ["DIVERGENCE_FACTOR", "GridResult", "fit_grid", "select_point"]

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

    Diverged points (NaN ``best_val_acc``) are never selected.

    Args:
        points: A `points` table of :class:`GridResult`.

    Raises:
        FloatingPointError: Every point diverged.
    """
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
    **build_options,
) -> GridResult:
    """Train one head per (lr, weight decay) grid point together, and select the point on `val`.

    Args:
        probe: A registered probe name (built for the tokens with ``seed`` and `build_options`),
            a freshly built probe, or a function returning one. Every head starts as a copy of it.
        train: Training tokens.
        val: Validation tokens: each head's best epoch and the grid point are selected on them.
        lrs: Peak learning rates of the grid.
        weight_decays: Weight decays of the grid (on parameters with ndim > 1 only).
        epochs: Maximum number of epochs.
        batch_size: Samples per step (the global batch in a distributed run: a multiple of the number
            of processes); incomplete last batches are dropped when the set holds more than one batch
            (as in :func:`~epviz.training.fit`).
        optimizer: "adamw" or "lars".
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        label_smoothing: Cross-entropy label smoothing.
        early_stopping: Stop a head after this many epochs without a validation improvement.
        precision: "fp32" or "bf16" (autocast).
        device: Where to train; None picks CUDA when available.
        seed: Seed of the shuffling order (and of the initial weights when `probe` is a name), an integer >= 0.
        keep_all: Also return every head (:attr:`GridResult.probes`); costs one probe per point.
        progress: Show a tqdm bar over epochs.
        **build_options: Build options of the probe when `probe` is a name (``num_queries``, ...).

    Raises:
        ValueError: An empty grid, a non-positive or non-finite lr, a negative weight decay, a bool
            where a number is expected, a repeated grid point, bad fit options or tokens that do not fit
            the probe; in a distributed run, a `batch_size` that is not a multiple of the number of
            processes, or ranks given different options or data (ConfigError).
        FloatingPointError: Every grid point diverged.
    """
    lrs, weight_decays, points = _grid_points(lrs, weight_decays)
    check_fit_options(optimizer, precision, epochs, batch_size, warmup_epochs, label_smoothing, early_stopping, val)
    check_int("seed", seed, 0)
    if val is None:
        raise ValueError("fit_grid selects its grid point on held-out tokens: pass val=... (never the test split)")
    template = _template(probe, train, val, seed, build_options)
    check_training_data(template, train, val, "fit_grid")
    world = world_size() if is_distributed() else 1
    if world > 1:
        check_world(batch_size, len(train), 1, "fit_grid")
        check_same(
            "the grid options and data sizes",
            dict(
                points=points,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                warmup_epochs=warmup_epochs,
                label_smoothing=label_smoothing,
                early_stopping=early_stopping,
                precision=precision,
                seed=seed,
                train_size=len(train),
                val_size=len(val),
                probe=dict(template.config),
            ),
        )

    device = resolve_device(device)
    heads: list[Probe] = [copy.deepcopy(template).to(device) for _ in points]
    grid = torch.nn.ModuleList(heads)
    broadcast_module(grid)  # every rank starts from rank 0's weights (a no-op on one process)
    opt, owner = _grid_optimizer(heads, points, optimizer)
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(train) > batch_size
    steps = len(train) // batch_size if drop_last else 1
    val_batch = max(batch_size, 256)
    val_shard = None if world == 1 else np.arange(*part_bounds(len(val), rank(), world))

    k = len(points)
    active = list(range(k))  # heads still training
    diverged = [False] * k
    stale = [0] * k
    best_acc = [-math.inf] * k
    best_epoch: list[int | None] = [None] * k
    best_state: list[dict | None] = [None] * k
    epochs_run = [0] * k
    rows: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"fit_grid {template.name} x{k}", leave=False, disable=not progress or not is_main())
    with synced_batchnorm(grid, device):  # nothing is swapped on one process
        for epoch in bar:
            if not active:
                break
            for i in active:
                heads[i].train()
            loss_sum = [0.0] * k
            correct = torch.zeros(k, dtype=torch.long, device=device)
            seen = 0
            broke: dict[int, str] = {}
            batches = epoch_batches(train, epoch, seed, batch_size, generator, device, drop_last)
            for step, (batch, step_size) in enumerate(batches):
                if not active:
                    break  # every head diverged in this epoch
                at = epoch + step / steps
                for group, i in zip(opt.param_groups, owner):
                    group["lr"] = lr_at(at, points[i][0], epochs, warmup_epochs)
                opt.zero_grad(set_to_none=True)
                losses, hits = [], []
                weight = 1.0 if world == 1 else slice_weight(len(batch.labels), step_size)
                for i in active:
                    # one head at a time, forward then backward: only one head's activations are alive at once;
                    # the heads share no parameter, so this is the gradient of the sum of their losses
                    with autocast(device, precision):
                        logits = heads[i](batch.patch, batch.prefix).float()
                    loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
                    (loss if world == 1 else loss * weight).backward()
                    losses.append(loss.detach())
                    hits.append((logits.argmax(dim=1) == batch.labels).sum())
                n = len(batch.labels)
                if world == 1:
                    values = torch.stack(losses).tolist()  # one sync for all heads
                    step_hits = torch.stack(hits)
                else:  # the global batch's losses and hits, so that every rank stops the same heads
                    m = len(active)
                    local = [v * n for v in torch.stack(losses).tolist()] + torch.stack(hits).tolist() + [n]
                    sums = global_sums(local, device)
                    n = int(sums[-1])
                    values = [v / n for v in sums[:m]]
                    step_hits = torch.tensor([round(h) for h in sums[m : 2 * m]], dtype=torch.long, device=device)
                whys = [divergence(v, template.num_classes) for v in values]
                for i, why in zip(active, whys):
                    if why is not None:  # a diverging head takes no step: its weights stay as they were
                        heads[i].zero_grad(set_to_none=True)
                        broke[i] = f"{why} at epoch {epoch + 1}, step {step + 1}"
                average_gradients(p for i, why in zip(active, whys) if why is None for p in heads[i].parameters())
                opt.step()  # parameters without a gradient are left as they are
                correct[active] += step_hits
                for i, v in zip(active, values):
                    loss_sum[i] += v * n
                seen += n
                active = [i for i in active if i not in broke]

            trained = active + sorted(broke)
            val_loss, val_acc = _validate(heads, active, val, val_batch, device, precision, val_shard)
            hits_total = correct.tolist()
            for i in sorted(trained):
                epochs_run[i] = epoch + 1
                if i in broke:
                    row = dict(train_loss=math.nan, train_acc=math.nan, val_loss=math.nan, val_acc=math.nan)
                else:
                    row = dict(
                        train_loss=loss_sum[i] / seen, train_acc=hits_total[i] / seen, val_loss=val_loss[i], val_acc=val_acc[i]
                    )
                    if not math.isfinite(row["val_loss"]):
                        broke[i] = f"the validation loss became {row['val_loss']} after epoch {epoch + 1}"
                        row.update(val_loss=math.nan, val_acc=math.nan)
                rows.append(dict(point=i, lr=points[i][0], weight_decay=points[i][1], epoch=epoch + 1, **row))
                if i in broke:
                    continue
                if val_acc[i] > best_acc[i]:
                    best_acc[i], best_epoch[i], stale[i] = val_acc[i], epoch + 1, 0
                    best_state[i] = {name: t.detach().clone() for name, t in heads[i].state_dict().items()}
                else:
                    stale[i] += 1
            for i, why in sorted(broke.items()):
                diverged[i] = True
                if is_main():
                    warnings.warn(
                        f"grid point {i} (lr {points[i][0]:g}, weight decay {points[i][1]:g}) diverged: {why}; it is marked "
                        f"diverged and never selected (lower its lr{', or use precision=fp32' if precision != 'fp32' else ''})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            active = [i for i in active if i not in broke and not (early_stopping is not None and stale[i] >= early_stopping)]
            bar.set_postfix(active=len(active), best_val=f"{max(best_acc):.3f}")
    bar.close()

    for head, state in zip(heads, best_state):
        if state is not None:
            head.load_state_dict(state)
        head.eval()
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values(["point", "epoch"], ignore_index=True)
    final = history.groupby("point")["val_acc"].last()
    table = pd.DataFrame(
        dict(
            point=range(k),
            lr=[lr for lr, _ in points],
            weight_decay=[wd for _, wd in points],
            best_epoch=pd.array([None if d else e for e, d in zip(best_epoch, diverged)], dtype="Int64"),
            best_val_acc=[math.nan if d else a for a, d in zip(best_acc, diverged)],
            final_val_acc=[math.nan if d else float(final.get(i, math.nan)) for i, d in enumerate(diverged)],
            epochs_run=epochs_run,
            diverged=diverged,
        ),
        columns=POINT_COLUMNS,
    )
    best = select_point(table)
    config = dict(
        protocol=PROTOCOL if train.views == 1 else protocol_of(train) + "; heads trained together on one read per batch",
        select_on=SELECT_ON,
        lrs=lrs,
        weight_decays=weight_decays,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        early_stopping=early_stopping,
        precision=precision,
        device=str(device),
        torch_threads=torch.get_num_threads(),  # CPU sums (and a choice within val noise) depend on it
        seed=seed,
        train_size=len(train),
        val_size=len(val),
        train_origin=train.origin.as_dict(),
        val_origin=val.origin.as_dict(),
        probe=dict(template.config),
    )
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


def _grid_optimizer(heads: list[Probe], points: list[tuple[float, float]], name: str) -> tuple[torch.optim.Optimizer, list[int]]:
    """One optimiser over every head: the parameter groups :func:`make_optimizer` gives each head, side by side.

    Returns the optimiser and, per parameter group, the index of the head that owns it.
    """
    singles = [make_optimizer(head, name, lr, wd) for head, (lr, wd) in zip(heads, points)]
    groups, owner = [], []
    for i, single in enumerate(singles):
        for group in single.param_groups:
            if group["params"]:
                groups.append(dict(group))
                owner.append(i)
    return type(singles[0])(groups), owner  # type: ignore[call-arg]  # each group carries its own options


@torch.no_grad()
def _validate(
    heads: list[Probe],
    active: list[int],
    val: TokenSet,
    batch_size: int,
    device: torch.device,
    precision: str,
    shard: np.ndarray | None = None,
) -> tuple[list[float], list[float]]:
    """Mean cross-entropy and top-1 of every active head on `val`, in one pass (NaN for the others).

    With a `shard` (a distributed run) this rank scores those samples and the sums are all-reduced,
    so every rank returns the numbers of the whole set.
    """
    k = len(heads)
    if not active:
        return [math.nan] * k, [math.nan] * k
    for i in active:
        heads[i].eval()
    loss = torch.zeros(len(active), dtype=torch.float64, device=device)
    hits = torch.zeros(len(active), dtype=torch.long, device=device)
    batches = val.batches(batch_size, device=device) if shard is None else iter_batches(val, batch_size, device, shard)
    for batch in batches:
        with autocast(device, precision):
            logits = [heads[i](batch.patch, batch.prefix) for i in active]
        logits = [x.float() for x in logits]
        loss += torch.stack([F.cross_entropy(x, batch.labels, reduction="sum") for x in logits]).double()
        hits += torch.stack([(x.argmax(dim=1) == batch.labels).sum() for x in logits])
    if shard is not None:
        all_reduce_sum(loss)
        all_reduce_sum(hits)
    n = len(val)
    losses, accs = [math.nan] * k, [math.nan] * k
    for i, lsum, h in zip(active, loss.tolist(), hits.tolist()):
        losses[i], accs[i] = lsum / n, h / n
    return losses, accs
