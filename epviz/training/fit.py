"""Training probes on cached tokens.

:func:`fit` trains a probe on a :class:`~epviz.tokenset.TokenSet` with the reference
recipe's optimiser and schedule: LARS (momentum 0.9, trust coefficient 0.001,
lr = 0.1 * batch / 256) or AdamW, linear warm-up then cosine decay per iteration,
cross-entropy, and selection of the epoch with the best validation top-1.

Protocol note: the tokens are extracted once and cached, so every epoch sees the
same tokens of the same (un-augmented) images. This is much cheaper than the
reference protocol, which runs the frozen backbone on a fresh RandomResizedCrop and
flip of every image at every step; accuracies from the two are not interchangeable.
Between the two lies a third protocol: a cache of K augmented views per image
(``extract_tokens(..., views=K)``), of which ``fit`` draws one per image per epoch
(:meth:`TokenSet.for_epoch`); the fit's ``config["protocol"]`` says which was followed.

Runs are deterministic on CPU for a given seed: shuffling uses its own
``torch.Generator``; build the probe with ``epviz.probes.build(..., seed=...)`` so
its initial weights are seeded too.

Under ``torchrun`` (a process group of W > 1 processes, see :mod:`epviz.distributed`) :func:`fit`
trains data-parallel and gives the result of one process on the same global batch; see
:mod:`epviz.training.distributed_fit` for how.

A run diverges as a grid point of :func:`~epviz.training.fit_grid` does (:func:`divergence`): it
then stops, the epoch gets NaN numbers, the result is marked :attr:`FitResult.diverged` (``best_acc``
NaN) and a RuntimeWarning names the probe, the epoch, the loss and the learning rate.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from epviz.checks import check_int
from epviz.distributed import check_same, is_distributed, is_main, world_size
from epviz.errors import ConfigError, DataError
from epviz.evaluate import check_labels, loss_and_accuracy
from epviz.probes import Probe
from epviz.runtime import autocast, resolve_device
from epviz.tokens import TokenSet
from epviz.training.checkpoints import finite_or_none, save_probe
from epviz.training.distributed_fit import (
    check_world,
    distributed_training,
    epoch_batches,
    global_sums,
    sharded_loss_and_accuracy,
    slice_weight,
)
from epviz.training.optim import check_fit_options, default_warmup, lr_at, make_optimizer
from epviz.training.selection import check_selection_split

__all__ = ["DIVERGENCE_FACTOR", "fit", "FitResult", "PROTOCOL", "check_classes", "check_training_data", "divergence"]

PROTOCOL = "cached tokens (one backbone pass, no augmentation)"
VIEWS_PROTOCOL = "cached tokens of {views} stored augmented views per image (one drawn per image per epoch)"
DIVERGENCE_FACTOR = 100.0  # a training loss above this many times a uniform guess's (ln C) has diverged


def divergence(loss: float, num_classes: int) -> str | None:
    """Why a training loss means the run diverged (not finite, or above ``DIVERGENCE_FACTOR * ln(C)``), else None.

    The one rule of :func:`fit` and :func:`~epviz.training.fit_grid`.
    """
    limit = DIVERGENCE_FACTOR * math.log(max(num_classes, 2))
    if math.isfinite(loss) and loss <= limit:
        return None
    return f"the training loss became {loss:.4g} (limit {limit:.4g} = {DIVERGENCE_FACTOR:g} ln {max(num_classes, 2)})"


def protocol_of(train: TokenSet) -> str:
    """The protocol a fit on `train` follows: cached tokens, with or without stored views."""
    return PROTOCOL if train.views == 1 else VIEWS_PROTOCOL.format(views=train.views)


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        probe: The trained probe holding the best epoch's weights, in eval mode.
        history: One row per epoch: epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds.
            train_loss / train_acc are running means over the epoch's steps (train mode).
        best_epoch: Epoch (1-based) whose weights `probe` holds (0: a run that diverged in its first epoch).
        best_acc: Validation top-1 at `best_epoch` (NaN without validation, or when the run diverged).
        final_acc: Validation top-1 at the last epoch run (NaN without validation, or when the run diverged).
        seconds: Wall time of the whole fit.
        config: Fit options, the probe's build options and the data sizes.
    """

    probe: Probe
    history: pd.DataFrame
    best_epoch: int
    best_acc: float
    final_acc: float
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Whether training diverged (see :func:`divergence`); the probe then holds the best epoch before it."""
        return bool(self.config.get("diverged", False))

    @property
    def grid_points(self) -> pd.DataFrame | None:
        """For a tuned run (:func:`epviz.training.tuning.tune`): one row per grid point (lr, weight_decay,
        best_epoch, best_val_acc, ...); None for a single fit."""
        grid = self.config.get("grid")
        return None if grid is None else pd.DataFrame(grid["points"])

    @property
    def grid_history(self) -> pd.DataFrame | None:
        """For a tuned run: every grid point's validation curve (one row per point x epoch); None for a single fit."""
        grid = self.config.get("grid")
        return None if grid is None else pd.DataFrame(grid["history"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (options, history); returns `<path>`."""
        summary = {
            "fit": self.config,
            "history": self.history.to_dict("records"),
            "best_epoch": self.best_epoch,
            "best_acc": finite_or_none(self.best_acc),
            "final_acc": finite_or_none(self.final_acc),
            "seconds": self.seconds,
        }
        return save_probe(self.probe, path, summary)


def fit(
    probe: Probe,
    train: TokenSet,
    val: TokenSet | None = None,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    optimizer: str = "lars",
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup_epochs: float | None = None,
    label_smoothing: float = 0.0,
    early_stopping: int | None = None,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    tensorboard: str | os.PathLike | None = None,
) -> FitResult:
    """Train `probe` on `train`, selecting the epoch with the best top-1 on `val`.

    Distributed training: in an initialised process group of W > 1 processes (``torchrun``, then
    :func:`epviz.distributed.init_from_env`), every rank calls :func:`fit` with the same arguments and
    gets the same result, that of one process with the same `batch_size` and `seed` (up to float
    rounding). `batch_size` stays the global batch: every rank draws the same permutation and takes
    its contiguous 1/W slice of each global batch; gradients are averaged by
    ``DistributedDataParallel`` with each rank's loss weighted so that the step is that of the mean
    loss over the global batch; the probe's BatchNorm layers normalise with the global batch's
    statistics (synced, see :mod:`epviz.training.distributed_fit`) and are plain BatchNorm again in
    the returned probe; each rank scores a contiguous shard of `val` and the sums are all-reduced, as
    are the training losses and accuracies, so every rank holds the same history and best epoch.
    Only rank 0 writes (`tensorboard`) and shows progress.

    Args:
        probe: A freshly built probe (trained in place).
        train: Training tokens.
        val: Validation tokens; without them the last epoch is kept. Held-out training data,
            never the test split: a UserWarning says so when ``val.origin.split`` is "test".
        epochs: Maximum number of epochs.
        batch_size: Samples per step (the global batch in a distributed run: a multiple of the number
            of processes). Incomplete last batches are dropped when the set holds more than one batch.
        optimizer: "lars" (reference recipe) or "adamw".
        lr: Peak learning rate; default 0.1 * batch_size / 256 for LARS, 1e-3 for AdamW.
        weight_decay: Weight decay on parameters with ndim > 1.
        warmup_epochs: Epochs of linear warm-up before the cosine decay; default (None) the reference's
            ratio, 10 of 90 epochs: ``min(10, epochs / 9)``.
        label_smoothing: Cross-entropy label smoothing.
        early_stopping: Stop after this many epochs without a validation improvement.
        precision: "fp32" or "bf16" (autocast).
        device: Where to train; None picks CUDA when available.
        seed: Seed for the shuffling order (an integer >= 0).
        progress: Show a tqdm bar over epochs.
        tensorboard: A folder to log every epoch's losses, accuracies and learning rate to with
            ``torch.utils.tensorboard`` (tags ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
            ``lr``; step = epoch), flushed every epoch; None (default) logs nothing and imports nothing.
            Needs the optional ``tensorboard`` package.

    Returns:
        The run; one that diverged is marked :attr:`FitResult.diverged`, with a RuntimeWarning.

    Raises:
        ImportError: `tensorboard` is set but the tensorboard package is not installed.
        ConfigError: An option out of range (lr <= 0, negative weight decay, warm-up longer than the
            run, ...; see :func:`~epviz.training.optim.check_fit_options`), labels outside
            [0, probe.num_classes), tokens the probe cannot read, or (distributed) a `batch_size` that
            is not a multiple of the number of processes, or ranks given different options or data.
        DataError: An empty or one-sample set, a training set of a single class (see
            :func:`check_classes`; validation classes missing from training only warn), or NaN/inf
            anywhere in the train or val tokens (the whole set is scanned once, before any step).
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"fit expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    warmup_epochs = default_warmup(epochs) if warmup_epochs is None else warmup_epochs
    check_fit_options(
        optimizer,
        precision,
        epochs,
        batch_size,
        warmup_epochs,
        label_smoothing,
        early_stopping,
        val,
        lr=lr,
        weight_decay=weight_decay,
    )
    check_int("seed", seed, 0)
    check_training_data(probe, train, val, "fit")
    world = world_size() if is_distributed() else 1
    if world > 1:
        check_world(batch_size, len(train), 1, "fit")
        check_same(
            "the fit options and data sizes",
            dict(
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                lr=lr,
                weight_decay=weight_decay,
                warmup_epochs=warmup_epochs,
                label_smoothing=label_smoothing,
                early_stopping=early_stopping,
                precision=precision,
                seed=seed,
                train_size=len(train),
                val_size=None if val is None else len(val),
                probe=dict(probe.config),
            ),
        )

    device = resolve_device(device)
    probe.to(device)
    if lr is None:
        lr = 0.1 * batch_size / 256 if optimizer == "lars" else 1e-3
    opt = make_optimizer(probe, optimizer, lr, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(train) > batch_size
    steps = len(train) // batch_size if drop_last else 1

    rows, best_state, best_epoch, best_acc = [], None, 0, -math.inf
    stale, why = 0, None  # why: how the run diverged
    start = time.perf_counter()
    writer = None if tensorboard is None or not is_main() else tensorboard_writer(tensorboard)
    bar = tqdm(range(epochs), desc=f"fit {probe.name}", leave=False, disable=not progress or not is_main())
    example = train.batch(np.arange(2), device=device) if world > 1 else None  # two samples, to find unused parameters
    with distributed_training(probe, device, () if example is None else (example.patch, example.prefix)) as model:
        for epoch in bar:
            t0 = time.perf_counter()
            probe.train()
            loss_sum, correct, seen = 0.0, 0, 0
            batches = epoch_batches(train, epoch, seed, batch_size, generator, device, drop_last)
            for step, (batch, step_size) in enumerate(batches):
                current_lr = lr_at(epoch + step / steps, lr, epochs, warmup_epochs)
                for group in opt.param_groups:
                    group["lr"] = current_lr
                with autocast(device, precision):
                    logits = model(batch.patch, batch.prefix).float()
                loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                (loss if world == 1 else loss * slice_weight(len(batch.labels), step_size)).backward()
                loss_value = loss.item()
                n, hits = len(batch.labels), (logits.argmax(dim=1) == batch.labels).sum().item()
                if world > 1:  # the global batch's loss and hits, so that every rank decides alike
                    total, global_hits, global_n = global_sums([loss_value * n, hits, n], device)
                    n, hits = int(global_n), int(global_hits)
                    loss_value = total / n
                why = divergence(loss_value, probe.num_classes)
                if why is not None:  # as a diverging grid point: no step, the weights stay as they were
                    why += f" at epoch {epoch + 1}, step {step + 1} (lr {current_lr:.3g})"
                    break
                opt.step()
                loss_sum += loss_value * n
                correct += hits
                seen += n

            val_loss = val_acc = math.nan
            if val is not None and why is None:
                if world == 1:
                    val_loss, val_acc = loss_and_accuracy(
                        probe, val, batch_size=max(batch_size, 256), device=device, precision=precision
                    )
                else:
                    val_loss, val_acc = sharded_loss_and_accuracy(probe, val, max(batch_size, 256), device, precision)
                if not math.isfinite(val_loss):
                    why = f"the validation loss became {val_loss} after epoch {epoch + 1}"
            train_loss, train_acc = (loss_sum / seen, correct / seen) if why is None else (math.nan, math.nan)
            if why is not None:
                val_loss = val_acc = math.nan
            row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc)
            rows.append(dict(row, lr=current_lr, seconds=time.perf_counter() - t0))
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}")
            if writer is not None:
                log_epoch(writer, rows[-1])
            if why is not None:
                break

            if val is None:
                best_epoch = epoch + 1
            elif val_acc > best_acc:
                best_acc, best_epoch, stale = val_acc, epoch + 1, 0
                best_state = copy.deepcopy(probe.state_dict())
            else:
                stale += 1
                if early_stopping is not None and stale >= early_stopping:
                    break
    bar.close()
    if writer is not None:
        writer.close()
    if why is not None and is_main():
        warnings.warn(
            f"fit: probe '{probe.name}' diverged: {why}; it stopped there and is marked diverged (FitResult.diverged, "
            f"best_acc NaN), as fit_grid marks a diverging grid point: use a smaller learning rate than {lr:g}"
            f"{' or precision=fp32' if precision != 'fp32' else ''}",
            RuntimeWarning,
            stacklevel=2,
        )

    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    history = pd.DataFrame(rows, columns=["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"])
    config = dict(
        protocol=protocol_of(train),
        epochs=epochs,
        epochs_run=len(rows),
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        early_stopping=early_stopping,
        precision=precision,
        device=str(device),
        torch_threads=torch.get_num_threads(),  # CPU sums (and a choice within val noise) depend on it
        seed=seed,
        train_size=len(train),
        val_size=None if val is None else len(val),
        train_origin=train.origin.as_dict(),
        probe=dict(probe.config),
    )
    if world > 1:
        config["world_size"] = world
    config["diverged"] = why is not None
    return FitResult(
        probe=probe,
        history=history,
        best_epoch=best_epoch,
        best_acc=best_acc if val is not None and why is None else math.nan,
        final_acc=float(history["val_acc"].iloc[-1]),
        seconds=time.perf_counter() - start,
        config=config,
    )


# --- helpers ---------------------------------------------------------------------------


def tensorboard_writer(folder: str | os.PathLike):
    """A ``torch.utils.tensorboard.SummaryWriter`` logging to `folder`, imported only now.

    Raises:
        ImportError: The tensorboard package is not installed (it is optional).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            f"fit(tensorboard={str(folder)!r}) logs through torch.utils.tensorboard, which needs the tensorboard "
            f"package ({err}): install it with `pip install tensorboard`, or leave tensorboard=None"
        ) from None
    return SummaryWriter(log_dir=str(folder))


def log_epoch(writer, row: dict) -> None:
    """Log one history row to TensorBoard (NaN values, e.g. validation without a val set, are left out) and flush."""
    step = int(row["epoch"])
    for tag, column in (
        ("train/loss", "train_loss"),
        ("train/acc", "train_acc"),
        ("val/loss", "val_loss"),
        ("val/acc", "val_acc"),
        ("lr", "lr"),
    ):
        value = float(row[column])
        if math.isfinite(value):
            writer.add_scalar(tag, value, step)
    writer.flush()


def check_training_data(probe: Probe, train: TokenSet, val: TokenSet | None, caller: str) -> None:
    """Every check of the data a probe is trained on, once, before any step.

    The tokens fit the probe (width, prefix tokens, label range), validation is not a test split
    (a warning), training holds at least 2 samples of at least 2 classes, and neither set holds
    NaN or inf anywhere (the whole sets are scanned, not only the batches an epoch reads).

    Args:
        probe: The probe to train.
        train: Training tokens.
        val: Validation tokens, or None.
        caller: Name of the training function, for messages.

    Raises:
        TypeError: Not TokenSets.
        ConfigError: Tokens that do not fit the probe.
        DataError: Empty or single-class training data, NaN or inf tokens.
    """
    _check_tokens(probe, train, "train")
    if val is not None:
        _check_tokens(probe, val, "validation")
    check_selection_split(val, caller)
    if len(train) < 2:
        raise DataError(f"{caller} needs at least 2 training samples (BatchNorm uses batch statistics)")
    check_classes(train.labels, None if val is None else val.labels)
    _check_finite(train, "train")
    if val is not None:
        _check_finite(val, "validation")


def _check_tokens(probe: Probe, tokens: TokenSet, what: str) -> None:
    if not isinstance(tokens, TokenSet):
        raise TypeError(f"the {what} tokens must be a TokenSet, got {type(tokens).__name__}")
    if len(tokens) == 0:
        raise DataError(f"the {what} token set is empty")
    if tokens.dim != probe.dim:
        raise ConfigError(f"probe '{probe.name}' expects tokens of width D={probe.dim} but the {what} tokens have D={tokens.dim}")
    if probe.needs_prefix and tokens.prefix is None:
        raise ConfigError(f"probe '{probe.name}' reads prefix tokens ([CLS]) but the {what} tokens have none")
    check_labels(tokens.labels, probe.num_classes, what, f"probe '{probe.name}'")


def _check_finite(tokens: TokenSet, what: str) -> None:
    """Scan the whole set once, before any step: a NaN anywhere (even in a batch that would be dropped) is refused."""
    found = tokens.find_nonfinite()
    if found is not None:
        raise DataError(
            f"the {what} tokens contain NaN or inf ({found.part} tokens of sample {found.first}; {found.count} of "
            f"{found.total} samples hold NaN or inf): fix or re-extract them before training (check the backbone's "
            "weights and the images first; with finite ones, dtype='float32' avoids float16 overflow)"
        )


def check_classes(train_labels, val_labels=None) -> None:
    """Refuse a training set of one class; warn when validation holds classes the training set lacks.

    One class is refused rather than warned about: the loss reaches 0 at once, the probe predicts
    that class for everything and scores 1.0 on any validation set of the same class, so no result
    of such a run means anything. Validation classes missing from training are only warned about
    (a low-shot or subsampled split can lack a rare class legitimately), with the share of
    validation samples the probe cannot get right.

    Args:
        train_labels: Training labels.
        val_labels: Validation labels, or None.

    Raises:
        DataError: The training labels hold a single class.
    """
    train_labels = np.asarray(train_labels)
    classes = np.unique(train_labels)
    if len(classes) == 1:
        raise DataError(
            f"the training set holds a single class (label {int(classes[0])}, all {len(train_labels)} samples): a probe "
            "learns nothing from it (the loss drops to 0 and any validation set of that class scores 1.0); "
            "train on samples of at least 2 classes"
        )
    if val_labels is not None and len(val_labels):
        val_labels = np.asarray(val_labels)
        unseen = np.setdiff1d(np.unique(val_labels), classes)
        if len(unseen):
            share = float(np.isin(val_labels, unseen).mean())
            shown = ", ".join(str(int(c)) for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
            warnings.warn(
                f"the validation set holds {len(unseen)} classes the training set lacks ({shown}): "
                f"{share:.1%} of its samples cannot be predicted right, so validation accuracy is at most {1 - share:.3f}",
                UserWarning,
                stacklevel=3,
            )
