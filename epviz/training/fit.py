"""Training probes on cached tokens.

:func:`fit` trains a probe on a :class:`~epviz.tokenset.TokenSet` with the reference
recipe's optimiser and schedule: LARS (momentum 0.9, trust coefficient 0.001,
lr = 0.1 * batch / 256), AdamW or SGD, linear warm-up then cosine decay per iteration,
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

:func:`fit` is a stack of one head in the training engine (:mod:`epviz.training.engine`), the loop
:func:`~epviz.training.fit_grid` and :func:`~epviz.training.fit_images` use too.

A run diverges as a grid point of :func:`~epviz.training.fit_grid` does (:func:`divergence`): it
then stops, the epoch gets NaN numbers, the result is marked :attr:`FitResult.diverged` (``best_acc``
NaN) and a RuntimeWarning names the probe, the epoch, the loss and the learning rate.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from epviz.checks import check_int
from epviz.distributed import is_distributed, is_main, rank, world_size
from epviz.errors import ConfigError, DataError
from epviz.evaluate import check_labels
from epviz.probes import Probe
from epviz.runtime import resolve_device, resolve_precision
from epviz.tokens import TokenSet
from epviz.training import engine
from epviz.training.checkpoints import finite_or_none, save_probe
from epviz.training.distributed_fit import check_world, epoch_batches, part_bounds, slice_weight
from epviz.training.engine import DIVERGENCE_FACTOR, HISTORY_COLUMNS, Micro, Recipe, divergence
from epviz.training.optim import check_fit_options, default_warmup
from epviz.training.selection import check_selection_split
from epviz.training.stack import HeadStack

__all__ = ["DIVERGENCE_FACTOR", "fit", "FitResult", "PROTOCOL", "check_classes", "check_training_data", "divergence"]

PROTOCOL = "cached tokens (one backbone pass, no augmentation)"
VIEWS_PROTOCOL = "cached tokens of {views} stored augmented views per image (one drawn per image per epoch)"


def protocol_of(train: TokenSet) -> str:
    """The protocol a fit on `train` follows: cached tokens, with or without stored views."""
    return PROTOCOL if train.views == 1 else VIEWS_PROTOCOL.format(views=train.views)


def run_facts(device: torch.device, seed: int, train: TokenSet, val: TokenSet | None) -> dict[str, Any]:
    """What a run's config records of where it ran and on what: device, torch threads, seed, set sizes, train origin."""
    return dict(
        device=str(device),
        torch_threads=torch.get_num_threads(),  # CPU sums (and a choice within val noise) depend on it
        seed=seed,
        train_size=len(train),
        val_size=None if val is None else len(val),
        train_origin=train.origin.as_dict(),
    )


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
    checkpoint: str | os.PathLike | None = None,
) -> FitResult:
    """Train `probe` on `train`, selecting the epoch with the best top-1 on `val`.

    Distributed training: in an initialised process group of W > 1 processes (``torchrun``, then
    :func:`epviz.distributed.init_from_env`), every rank calls :func:`fit` with the same arguments and
    gets the same result, that of one process with the same `batch_size` and `seed` (up to float
    rounding). `batch_size` stays the global batch: every rank draws the same permutation and takes
    its contiguous 1/W slice of each global batch; gradients are averaged over
    the ranks in one all-reduce (what DDP does) with each rank's loss weighted so that the step is that of the mean
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
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 where the device computes it natively, else fp32).
        device: Where to train; None picks CUDA when available.
        seed: Seed for the shuffling order (an integer >= 0).
        progress: Show a tqdm bar over epochs.
        tensorboard: A folder to log every epoch's losses, accuracies and learning rate to with
            ``torch.utils.tensorboard`` (tags ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``,
            ``lr``; step = epoch), flushed every epoch; None (default) logs nothing and imports nothing.
            Needs the optional ``tensorboard`` package.
        checkpoint: A file to write the training state to after every epoch; a fit started again with the
            same arguments and checkpoint resumes after the last epoch written (one that finished returns at once).

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
    device = resolve_device(device)
    precision = resolve_precision(device, precision)  # "auto": bf16 only where the device computes it natively
    lr = default_lr(optimizer, batch_size) if lr is None else lr
    recipe = Recipe(epochs, optimizer, warmup_epochs, label_smoothing, early_stopping, precision)
    config = dict(
        protocol=protocol_of(train),
        **recipe.options(),
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        **run_facts(device, seed, train, val),
        probe=dict(probe.config),
    )
    world = check_world(batch_size, len(train), 1, "fit", config)
    if world > 1:
        config["world_size"] = world
    writer = None if tensorboard is None or not is_main() else tensorboard_writer(tensorboard)
    try:
        return train_one(
            probe, TokenBatches(train, val, batch_size, seed, device), recipe, config, "fit", progress, checkpoint, writer
        )
    finally:
        if writer is not None:
            writer.close()


def train_one(
    probe: Probe,
    batches: engine.Batches,
    recipe: Recipe,
    config: dict,
    caller: str,
    progress: bool,
    checkpoint: str | os.PathLike | None,
    writer=None,
) -> FitResult:
    """Train one probe in place through the engine (:func:`fit` and :func:`~epviz.training.fit_images.fit_images`).

    Args:
        probe: The probe, trained in place and left holding its best epoch's weights, in eval mode.
        batches: Its training and validation batches.
        recipe: The shared options.
        config: What the result records (``lr``, ``weight_decay``, ``device`` and the rest of the options,
            sizes and protocol); it is also the identity a checkpoint must match (device and threads aside).
        caller: The trainer's name, for the progress bar and the divergence warning.
        progress: Show a progress bar.
        checkpoint: A file to write the state to after every epoch and resume from.
        writer: A TensorBoard writer, or None.
    """
    device = torch.device(config["device"])
    lr = config["lr"]
    trained = engine.train(
        HeadStack([probe], device),
        batches,
        recipe,
        [lr],
        [config["weight_decay"]],
        device=device,
        desc=f"{caller} {probe.name}",
        progress=progress,
        writer=writer,
        checkpoint=checkpoint,
        identity={k: v for k, v in config.items() if k not in ("device", "torch_threads")},
    )
    why = trained.diverged[0]
    if why is not None and is_main():
        warnings.warn(
            f"{caller}: probe '{probe.name}' diverged: {why}; it stopped there and is marked diverged (FitResult.diverged, "
            f"best_acc NaN), as fit_grid marks a diverging grid point: use a smaller learning rate than {lr:g}"
            f"{' or precision=fp32' if recipe.precision != 'fp32' else ''}",
            RuntimeWarning,
            stacklevel=3,
        )
    probe.to(device).load_state_dict(trained.heads[0].state_dict())
    probe.eval()
    history = pd.DataFrame(trained.history, columns=HISTORY_COLUMNS).drop(columns="head")
    return FitResult(
        probe=probe,
        history=history,
        best_epoch=trained.best_epoch[0],
        best_acc=trained.best_acc[0] if batches.validation_size() else math.nan,
        final_acc=float(history["val_acc"].iloc[-1]),
        seconds=trained.seconds,
        config=dict(config, epochs_run=trained.epochs_run[0], diverged=why is not None),
    )


def default_lr(optimizer: str, batch_size: int) -> float:
    """The default peak lr: the reference's 0.1 x batch / 256 for LARS and SGD, 1e-3 for AdamW."""
    return 1e-3 if optimizer == "adamw" else 0.1 * batch_size / 256


class TokenBatches:
    """The engine's batches from cached tokens: shuffled global batches (this rank's slice of each), validation in order.

    Args:
        train: Training tokens (with stored views, one view per image per epoch).
        val: Validation tokens, or None.
        batch_size: The global batch; an incomplete last batch is dropped when the set holds more than one.
        seed: Seed of the shuffling.
        device: Where batches go.
    """

    def __init__(self, train: TokenSet, val: TokenSet | None, batch_size: int, seed: int, device: torch.device) -> None:
        self.train, self.val, self.batch_size, self.seed, self.device = train, val, batch_size, seed, device
        self.generator = torch.Generator().manual_seed(seed)
        self.drop_last = len(train) > batch_size
        self.steps_per_epoch = len(train) // batch_size if self.drop_last else 1
        world = world_size() if is_distributed() else 1
        self.val_index = None if val is None or world == 1 else np.arange(*part_bounds(len(val), rank(), world))

    def epoch(self, epoch: int) -> Iterator[Iterator[Micro]]:
        for batch, step_size in epoch_batches(
            self.train, epoch, self.seed, self.batch_size, self.generator, self.device, self.drop_last
        ):
            yield iter([Micro(batch.patch, batch.prefix, batch.labels, slice_weight(len(batch.labels), step_size))])

    def validation(self) -> Iterator[Micro] | None:
        if self.val is None:
            return None
        size = max(self.batch_size, 256)
        if self.val_index is None:
            batches = self.val.batches(size, device=self.device)
        else:
            batches = (
                self.val.batch(self.val_index[i : i + size], device=self.device) for i in range(0, len(self.val_index), size)
            )
        return (Micro(b.patch, b.prefix, b.labels) for b in batches)

    def validation_size(self) -> int:
        return 0 if self.val is None else len(self.val)

    def random_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def set_random_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


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
