"""The one training loop of epviz: K stacked heads, one forward and one backward per batch.

Every trainer feeds it: :func:`~epviz.training.fit` (a stack of one head on cached tokens),
:func:`~epviz.training.fit_grid` (a stack of K grid points), :func:`~epviz.training.fit_images` (tokens
computed by the backbone at every step). What it owns, once:

* the schedule: linear warm-up, then half-cosine per step, each head at its own peak lr;
* the optimisers (:mod:`~epviz.training.optim`: AdamW, LARS, SGD over the stacked parameters);
* autocast (``precision``), gradient accumulation (a step is one or more weighted micro-batches);
* per-head divergence (:func:`divergence`): a head whose training loss is not finite or exceeds
  ``DIVERGENCE_FACTOR * ln C`` takes no step from then on and is marked, the others go on;
* per-head best epoch on validation, early stopping and successive halving (``Recipe.halving``,
  :func:`halving_rungs`); stopped heads leave the stack at the end of the epoch, so the others' steps get cheaper;
* distributed training: every rank reads its slice of each global batch, each slice's loss is weighted
  so that the all-reduced gradient is that of the global batch's mean (:func:`~epviz.training.distributed_fit.slice_weight`,
  :func:`~epviz.training.distributed_fit.average_gradients`), BatchNorm uses the global batch's
  statistics, losses and validation sums are all-reduced, so every rank decides alike;
* checkpoint and resume: with ``checkpoint=path`` the whole state (weights, optimiser, best epochs,
  history, random streams) is written atomically after every epoch, and a run started again with the
  same arguments resumes after the last epoch written;
* progress (a tqdm bar over epochs) and TensorBoard logging.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from epviz.atomic import atomic_write
from epviz.distributed import all_reduce_sum, is_distributed, is_main, world_size
from epviz.errors import ConfigError, WeightsError
from epviz.probes import Probe
from epviz.runtime import autocast
from epviz.safe_load import check_archive, torch_errors
from epviz.training.distributed_fit import average_gradients, broadcast_state, global_sums, synced_batchnorm
from epviz.training.optim import lr_at, make_optimizer
from epviz.training.stack import HeadStack

__all__ = ["DIVERGENCE_FACTOR", "Micro", "Recipe", "Trained", "divergence", "halving_keep", "halving_rungs", "train"]

DIVERGENCE_FACTOR = 100.0  # a training loss above this many times a uniform guess's (ln C) has diverged
HISTORY_COLUMNS = ["head", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def divergence(loss: float, num_classes: int) -> str | None:
    """Why a training loss means the run diverged (not finite, or above ``DIVERGENCE_FACTOR * ln(C)``), else None."""
    limit = DIVERGENCE_FACTOR * math.log(max(num_classes, 2))
    if math.isfinite(loss) and loss <= limit:
        return None
    return f"the training loss became {loss:.4g} (limit {limit:.4g} = {DIVERGENCE_FACTOR:g} ln {max(num_classes, 2)})"


class Micro(NamedTuple):
    """One micro-batch of a step: tokens, labels, and the weight of its mean loss in the step's gradient."""

    patch: torch.Tensor
    prefix: torch.Tensor | None
    labels: torch.Tensor
    weight: float = 1.0


class Batches(Protocol):
    """Where the engine's batches come from (cached tokens, or images through a backbone)."""

    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[Iterator[Micro]]:
        """This rank's steps of `epoch`, each an iterator over its micro-batches."""

    def validation(self) -> Iterator[Micro] | None:
        """This rank's validation batches (its shard in a distributed run), or None without validation."""

    def validation_size(self) -> int:
        """Samples in the whole validation set (over every rank)."""

    def random_state(self) -> dict[str, torch.Tensor]:
        """The random streams an epoch draws from, to checkpoint."""

    def set_random_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`random_state`."""


@dataclass(frozen=True)
class Recipe:
    """The options every head of one training shares."""

    epochs: int
    optimizer: str
    warmup_epochs: float
    label_smoothing: float = 0.0
    early_stopping: int | None = None
    precision: str = "fp32"
    halving: int | None = None

    def options(self) -> dict[str, Any]:
        """The recipe as a run's config records it (``halving`` only when set)."""
        options = asdict(self)
        if self.halving is None:
            del options["halving"]
        return options


def halving_rungs(epochs: int, eta: int | None, heads: int) -> list[int]:
    """The rungs of successive halving (Hyperband's bracket with every head at the start): with
    ``s = floor(log_eta(heads))``, after epochs ``round(epochs / eta^i)`` for i = s, ..., 1 (each >= 1, < epochs).

    At each rung the heads still training are ranked by their best validation top-1 so far and only the
    best ``ceil(n / eta)`` go on (ties go to the earlier head of the grid); the others stop, keep their best
    epoch, and are marked ``halved``. With eta = 3, 9 heads and 15 epochs the rungs are epochs 2 and 5:
    9 heads become 3, then 1. None: no halving.
    """
    if eta is None or heads < 2:
        return []
    s = 0
    while eta ** (s + 1) <= heads:
        s += 1
    return sorted({max(1, round(epochs / eta**i)) for i in range(1, s + 1)} - {epochs})


def halving_keep(scores: dict[int, float], eta: int) -> set[int]:
    """The heads successive halving keeps at a rung: the best ``ceil(n / eta)`` of `scores` (head -> best val
    top-1 so far); ties go to the earlier head."""
    ranked = sorted(scores, key=lambda head: (-scores[head], head))
    return set(ranked[: math.ceil(len(scores) / eta)])


@dataclass
class Trained:
    """What :func:`train` returns, one entry per head in the order given.

    Attributes:
        heads: Each head holding its best epoch's weights (the last epoch's without validation; for a
            head that diverged, the best epoch before it, or its weights when it diverged), eval mode.
        history: One row per head x epoch run (``HISTORY_COLUMNS``); the epoch in which a head diverged
            has NaN losses and accuracies.
        best_epoch: 1-based; 0 when no epoch finished.
        best_acc: Validation top-1 at the best epoch (NaN without validation, or for a diverged head).
        diverged: Why each head diverged, or None.
        epochs_run: Epochs each head trained.
        halved: The rung (epoch) at which successive halving stopped each head; 0 when it did not.
        seconds: Wall time.
    """

    heads: list[Probe]
    history: list[dict]
    best_epoch: list[int]
    best_acc: list[float]
    diverged: list[str | None]
    epochs_run: list[int]
    halved: list[int]
    seconds: float


def train(
    stack: HeadStack,
    batches: Batches,
    recipe: Recipe,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    device: torch.device,
    desc: str,
    progress: bool = True,
    writer: Any = None,
    checkpoint: str | os.PathLike | None = None,
    identity: dict | None = None,
) -> Trained:
    """Train the K heads of `stack` together on `batches` following `recipe`; see the module docstring.

    Args:
        stack: The heads, stacked.
        batches: Training (and validation) batches.
        recipe: Shared options.
        lrs: Peak learning rate of each head.
        weight_decays: Weight decay of each head.
        device: Where the stack lives.
        desc: The progress bar's label.
        progress: Show a tqdm bar over epochs (rank 0 only).
        writer: A TensorBoard SummaryWriter (rank 0), or None.
        checkpoint: A file to write the state to after every epoch, and to resume from when it exists.
        identity: What the run is (options, data sizes, probe): a checkpoint written by another run is refused.

    Raises:
        ConfigError: `checkpoint` holds the state of another run.
        WeightsError: `checkpoint` is not a readable checkpoint.
    """
    k = len(stack)
    if len(lrs) != k or len(weight_decays) != k:
        raise ConfigError(f"{k} heads need {k} learning rates and weight decays, got {len(lrs)} and {len(weight_decays)}")
    world = world_size() if is_distributed() else 1
    if world > 1:
        stack.mode = "loop"  # BatchNorm synced over the ranks is not batched by vmap, nor by a hand-stacked form
        broadcast_state(stack.state())  # every rank starts from rank 0's weights
    num_classes = stack.template.num_classes
    opt = make_optimizer(recipe.optimizer, stack.params, lrs, weight_decays)
    live = list(range(k))  # the head each row of the stack holds
    best = {n: t.clone() for n, t in stack.state().items()}  # full size: each head's best (or final) state
    best_acc, best_epoch, stale = [-math.inf] * k, [0] * k, [0] * k
    why: list[str | None] = [None] * k
    epochs_run, rows, first = [0] * k, [], 0
    halved = [0] * k  # the rung at which successive halving stopped each head (0: it was not stopped)
    key = json.dumps(identity or {}, sort_keys=True, default=str)
    if checkpoint is not None and Path(checkpoint).exists():
        saved = _read_checkpoint(Path(checkpoint), key)
        live, first, rows = saved["live"], saved["epoch"], saved["rows"]
        best_acc, best_epoch, stale, epochs_run = saved["best_acc"], saved["best_epoch"], saved["stale"], saved["epochs_run"]
        halved = saved["halved"]
        why = [w or None for w in saved["why"]]
        best = saved["best"]
        stack.keep(torch.as_tensor(live, dtype=torch.long, device=device))
        stack.load(saved["stack"])
        opt.params = stack.params
        opt.load_state_dict(saved["optimizer"])
        batches.set_random_state(saved["random"])
    steps = max(batches.steps_per_epoch, 1)
    rungs = set(halving_rungs(recipe.epochs, recipe.halving, k)) if batches.validation_size() else set()
    start = time.perf_counter()
    bar = tqdm(
        range(first, recipe.epochs), desc=f"{desc} x{k}" if k > 1 else desc, leave=False, disable=not progress or not is_main()
    )
    with synced_batchnorm(stack.template, device):  # nothing is swapped on one process
        for epoch in bar:
            if not live:
                break
            t0 = time.perf_counter()
            stack.train(True)
            n_live = len(live)
            loss_sum = torch.zeros(n_live, dtype=torch.float64)
            hits_sum = torch.zeros(n_live, dtype=torch.float64)
            seen, factor = 0, 0.0
            stepping = torch.ones(n_live, dtype=torch.bool)  # rows still taking steps in this epoch
            broke: dict[int, str] = {}  # row -> why
            for step, micros in enumerate(batches.epoch(epoch)):
                factor = lr_at(epoch + step / steps, 1.0, recipe.epochs, recipe.warmup_epochs)
                stack.zero_grad()
                step_loss = torch.zeros(n_live, dtype=torch.float64, device=device)
                step_hits = torch.zeros(n_live, dtype=torch.float64, device=device)
                step_n = 0
                for micro in micros:
                    b = len(micro.labels)
                    for part in stack.parts():  # one pass for the whole stack, or one head at a time in loop mode
                        with autocast(device, recipe.precision):
                            logits = stack(micro.patch, micro.prefix, part).float()  # (K, B, C)
                        n = len(logits)
                        losses = (
                            F.cross_entropy(
                                logits.reshape(n * b, -1),
                                micro.labels.repeat(n),
                                label_smoothing=recipe.label_smoothing,
                                reduction="none",
                            )
                            .view(n, b)
                            .mean(dim=1)
                        )
                        (losses.sum() if micro.weight == 1 else losses.sum() * micro.weight).backward()
                        step_loss[part] += losses.detach().double() * b
                        step_hits[part] += (logits.detach().argmax(dim=2) == micro.labels).sum(dim=1).double()
                    step_n += b
                sums = global_sums([*step_loss.tolist(), *step_hits.tolist(), step_n], device)  # the global batch's
                step_n = int(sums[-1])
                values = [v / step_n for v in sums[:n_live]]
                for row, value in enumerate(values):
                    reason = divergence(value, num_classes) if stepping[row] else None
                    if reason is not None:  # a diverging head takes no step: its weights stay as they were
                        broke[row] = f"{reason} at epoch {epoch + 1}, step {step + 1} (lr {factor * lrs[live[row]]:.3g})"
                        stepping[row] = False
                stack.gather_grads()
                if world > 1:
                    average_gradients(stack.params.values())
                opt.step(factor, stepping)
                ok = stepping.double()
                loss_sum += torch.tensor(values, dtype=torch.float64).nan_to_num(0.0) * step_n * ok
                hits_sum += torch.tensor(sums[n_live : 2 * n_live], dtype=torch.float64) * ok
                seen += step_n
                if not stepping.any():
                    break  # every head diverged in this epoch

            scores = _validate(stack, batches, recipe.precision, device, stepping)
            ended: list[int] = []
            for row, head in enumerate(live):
                epochs_run[head] = epoch + 1
                record = dict(
                    head=head,
                    epoch=epoch + 1,
                    train_loss=math.nan,
                    train_acc=math.nan,
                    val_loss=math.nan,
                    val_acc=math.nan,
                    lr=factor * lrs[head],
                    seconds=0.0,
                )
                if row not in broke:
                    record.update(train_loss=loss_sum[row].item() / seen, train_acc=hits_sum[row].item() / seen)
                    if scores is not None:
                        record.update(val_loss=scores[0][row], val_acc=scores[1][row])
                    if scores is not None and not math.isfinite(scores[0][row]):
                        broke[row] = f"the validation loss became {scores[0][row]} after epoch {epoch + 1}"
                        record.update(train_loss=math.nan, train_acc=math.nan, val_loss=math.nan, val_acc=math.nan)
                rows.append(record)
                if row in broke:
                    why[head] = broke[row]
                    ended.append(row)
                    if best_epoch[head] == 0:  # no epoch finished: it keeps the weights it diverged with
                        _copy_row(best, stack.state(), head, row)
                    continue
                if scores is None:  # no validation: the last epoch is kept
                    best_epoch[head] = epoch + 1
                    _copy_row(best, stack.state(), head, row)
                elif scores[1][row] > best_acc[head]:
                    best_acc[head], best_epoch[head], stale[head] = scores[1][row], epoch + 1, 0
                    _copy_row(best, stack.state(), head, row)
                else:
                    stale[head] += 1
                    if recipe.early_stopping is not None and stale[head] >= recipe.early_stopping:
                        ended.append(row)
            if epoch + 1 in rungs and recipe.halving:  # successive halving: the best 1/eta of the heads still training go on
                going = {live[row]: best_acc[live[row]] for row in range(len(live)) if row not in ended}
                kept = halving_keep(going, recipe.halving)
                for row in range(len(live)):
                    if live[row] in going and live[row] not in kept:
                        halved[live[row]] = epoch + 1
                        ended.append(row)
            seconds = time.perf_counter() - t0
            for record in rows[-len(live) :]:
                record["seconds"] = seconds
            if writer is not None:
                _log(writer, rows[-len(live) :], k)
            if ended:
                keep = [row for row in range(len(live)) if row not in ended]
                live = [live[row] for row in keep]
                index = torch.as_tensor(keep, dtype=torch.long)
                stack.keep(index.to(device))
                opt.keep(stack.params, index)
            bar.set_postfix(active=len(live), best_val=f"{max(best_acc):.3f}" if max(best_acc) > -math.inf else "-")
            if checkpoint is not None:
                _write_checkpoint(
                    Path(checkpoint),
                    dict(
                        key=key,
                        epoch=epoch + 1,
                        live=live,
                        rows=rows,
                        best_acc=best_acc,
                        best_epoch=best_epoch,
                        stale=stale,
                        epochs_run=epochs_run,
                        halved=halved,
                        why=[w or "" for w in why],
                        best=best,
                        stack=stack.state(),
                        optimizer=opt.state_dict(),
                        random=batches.random_state(),
                    ),
                )
    bar.close()
    heads = [stack.head(best, i) for i in range(k)]
    return Trained(
        heads=heads,
        history=rows,
        best_epoch=best_epoch,
        best_acc=[a if w is None and math.isfinite(a) else math.nan for a, w in zip(best_acc, why)],
        diverged=why,
        epochs_run=epochs_run,
        halved=halved,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _copy_row(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: int, row: int) -> None:
    for name, tensor in state.items():
        target[name][head] = tensor[row]


@torch.no_grad()
def _validate(
    stack: HeadStack, batches: Batches, precision: str, device: torch.device, stepping: torch.Tensor
) -> tuple[list[float], list[float]] | None:
    """Mean cross-entropy and top-1 of every head of the stack on the validation set, in one pass (None without one)."""
    k = len(stepping)
    source = batches.validation()
    if source is None:
        return None
    stack.train(False)
    loss = torch.zeros(k, dtype=torch.float64, device=device)
    hits = torch.zeros(k, dtype=torch.float64, device=device)
    if stepping.any():
        for micro in source:
            b = len(micro.labels)
            for part in stack.parts():
                with autocast(device, precision):
                    logits = stack(micro.patch, micro.prefix, part).float()
                n = len(logits)
                loss[part] += (
                    F.cross_entropy(logits.reshape(n * b, -1), micro.labels.repeat(n), reduction="none")
                    .view(n, b)
                    .double()
                    .sum(dim=1)
                )
                hits[part] += (logits.argmax(dim=2) == micro.labels).sum(dim=1).double()
    if is_distributed():
        all_reduce_sum(loss)
        all_reduce_sum(hits)
    total = batches.validation_size()
    return (loss / total).tolist(), (hits / total).tolist()


def _log(writer: Any, rows: list[dict], k: int) -> None:
    """Log the epoch's rows to TensorBoard (NaN values left out; with several heads, tags carry the head), and flush."""
    for row in rows:
        prefix = "" if k == 1 else f"head{row['head']}/"
        for tag, column in (
            ("train/loss", "train_loss"),
            ("train/acc", "train_acc"),
            ("val/loss", "val_loss"),
            ("val/acc", "val_acc"),
            ("lr", "lr"),
        ):
            value = row[column]
            if value is not None and math.isfinite(float(value)):
                writer.add_scalar(prefix + tag, float(value), int(row["epoch"]))
    writer.flush()


def _write_checkpoint(path: Path, state: dict) -> None:
    if is_main():
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def _read_checkpoint(path: Path, key: str) -> dict:
    """The state in `path`, read with ``weights_only=True`` after the archive checks, for the run `key` only."""
    check_archive(path)
    with torch_errors(path, "reading the training checkpoint"):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable file, named with the fix
            raise WeightsError(
                f"cannot read the training checkpoint {path} ({type(err).__name__}: {str(err)[:200]}): delete it to start afresh"
            ) from None
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise ConfigError(
            f"the training checkpoint {path} was written by another run (other options, data or probe): "
            "pass another checkpoint path, or delete it to start afresh"
        )
    return saved
