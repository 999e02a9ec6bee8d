"""The reference per-step protocol: images stream through the frozen backbone at every step.

:func:`fit_images` trains a probe as the reference implementation does: every training
step draws a fresh RandomResizedCrop (scale 0.08-1, bicubic) and horizontal flip of each
image, runs the frozen backbone on it, and trains the probe on the chosen block's tokens
(the block output, through the final norm where the reference applies it) with LARS, lr = 0.1 * batch / 256, linear warm-up then
cosine decay per step, and keeps the epoch with the best validation top-1. Validation
images get the evaluation transform (Resize 256 + CenterCrop 224) and also go through
the backbone every epoch.

This is much slower than training on cached tokens (:func:`epviz.fit`): the backbone's
forward pass, not the probe, dominates, and it is paid on every step of every epoch —
for MAE ViT-B on ImageNet-1k about 90 backbone passes over 1.28 M images. Use it on a
GPU when numbers must be comparable with the paper; the two protocols' accuracies are
not interchangeable.

The loop, optimiser, schedule and option checks are those of :func:`epviz.fit` (:mod:`epviz.training.engine`):
:class:`ImageBatches` feeds the engine tokens computed by the backbone at every step.

``accum_steps`` trades memory for time: each optimizer step accumulates the gradients of several
micro-batches. Under ``torchrun`` the run is data-parallel like :func:`epviz.fit` (see
:func:`fit_images` for both).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator

import numpy as np
import torch

from epviz.backbones import Backbone
from epviz.data.transforms import train_transform
from epviz.distributed import is_distributed, rank, world_size
from epviz.errors import ConfigError, DataError
from epviz.evaluate import check_labels
from epviz.probes import Probe
from epviz.runtime import autocast, resolve_device, resolve_precision
from epviz.training.distributed_fit import check_world, part_bounds, slice_weight
from epviz.training.engine import Micro, Recipe
from epviz.training.fit import FitResult, check_classes, default_lr, train_one
from epviz.training.optim import check_fit_options, default_warmup

__all__ = ["fit_images", "PROTOCOL_PER_STEP"]

PROTOCOL_PER_STEP = "per-step backbone (RandomResizedCrop 0.08-1 + flip at every step, no token cache)"

_SEED_EVERY_IMAGE = False  # True: seed each image's augmentation on one process too (tests compare world sizes with it)


def fit_images(
    probe: Probe,
    backbone: Backbone,
    train,
    val=None,
    *,
    layer: int = -1,
    epochs: int = 90,
    batch_size: int = 4096,
    optimizer: str = "lars",
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup_epochs: float | None = None,
    label_smoothing: float = 0.0,
    scale: tuple[float, float] = (0.08, 1.0),
    norm: bool | None = None,
    precision: str = "bf16",
    num_workers: int = 0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    accum_steps: int = 1,
    checkpoint: str | os.PathLike | None = None,
) -> FitResult:
    """Train `probe` on `backbone`'s tokens of augmented images, computed afresh at every step.

    Gradient accumulation: with ``accum_steps = k`` each optimizer step is the step of the global
    batch of `batch_size` images, cut into k contiguous micro-batches run one after the other (the
    backbone and the probe see ``batch_size / k`` images at a time, per process ``batch_size / (k W)``);
    each micro-batch's loss is weighted so that the accumulated gradient is that of the mean loss over
    the whole batch, and the learning-rate schedule counts optimizer steps. BatchNorm layers in
    training mode, which every probe's ``norm`` is, normalise each micro-batch with that
    micro-batch's statistics, so the step equals the single large-batch step exactly only for the
    layers without batch statistics; the rest differs as BatchNorm on smaller batches does.

    Distributed training: in an initialised process group of W > 1 processes (``torchrun``, then
    :func:`epviz.distributed.init_from_env`), every rank calls :func:`fit_images` with the same
    arguments and gets the same result, that of one process with the same `batch_size`,
    `accum_steps` and `seed` (up to float rounding). Every rank draws the same permutation; each
    micro-batch of each global batch is cut into W contiguous slices and rank r reads and augments
    only its slice. The accumulated gradients are averaged over the ranks once per step (one
    all-reduce, as DDP does); the probe's BatchNorm layers use the
    statistics of the micro-batch over all ranks and are plain BatchNorm again in the returned probe;
    each rank scores a contiguous shard of `val` and the sums are all-reduced, as are the training
    losses and accuracies, so every rank holds the same history and best epoch. Only rank 0 shows
    progress. The augmentation of a distributed run is drawn per image, from a generator seeded
    with (`seed`, epoch, the image's index), so that an image is cropped the same way whichever
    rank reads it; one process draws from one seeded stream in reading order, as it always has, so
    the crops of a one-process run and of a W-process run differ (both are seeded).

    Args:
        probe: A freshly built probe for the backbone's width (trained in place).
        backbone: The frozen backbone (:func:`epviz.load_backbone`).
        train: Training images: a dataset with ``with_transform`` (:class:`~epviz.data.annotated.AnnotatedImages`,
            e.g. from :func:`epviz.data.load_split`), so that the augmentation replaces its transform.
        val: Validation images under the evaluation transform; without them the last epoch is kept.
        layer: Block whose output the probe reads (0 = first, -1 = last).
        epochs: Number of epochs (reference: 90).
        batch_size: Images per optimizer step (reference: 4096), the global batch: a multiple of
            ``accum_steps`` times the number of processes. Incomplete last batches are dropped when
            the set holds more than one batch.
        optimizer: "lars" (reference) or "adamw".
        lr: Peak learning rate; default 0.1 * batch_size / 256 for LARS, 1e-3 for AdamW.
        weight_decay: Weight decay on parameters with ndim > 1 (reference: 0).
        warmup_epochs: Epochs of linear warm-up before the cosine decay; default (None) the reference's
            ratio, 10 of 90 epochs: ``min(10, epochs / 9)``.
        label_smoothing: Cross-entropy label smoothing (reference: 0).
        scale: RandomResizedCrop area range (reference: 0.08-1).
        norm: Apply the encoder's final norm to the block output; None follows the backbone's (the
            reference implementation's) convention, :attr:`~epviz.backbones.Backbone.final_norm`.
        precision: "bf16" (reference) or "fp32" for backbone and probe.
        num_workers: DataLoader worker processes decoding images (use several on a GPU machine).
        device: Where to run; None picks CUDA when present.
        seed: Seed of the shuffling and the augmentation.
        progress: Show a tqdm bar over epochs.
        accum_steps: Micro-batches accumulated per optimizer step (1: none).
        checkpoint: A file to write the training state to after every epoch, and to resume from (as in :func:`epviz.fit`).

    Returns:
        A :class:`~epviz.train.FitResult` (best epoch's weights, history, config with the protocol).

    Raises:
        ConfigError: An option out of range (see :func:`~epviz.training.optim.check_fit_options`; also
            `layer`, `scale` within (0, 1] with low <= high, `num_workers` >= 0, `accum_steps` a positive
            integer dividing `batch_size` into equal micro-batches per process), labels outside
            [0, probe.num_classes), a probe that cannot read the backbone's tokens, or (distributed)
            ranks given different options or data.
        DataError: An empty or one-image set, or a training set of a single class (validation
            classes missing from training only warn; see :func:`epviz.training.fit.check_classes`).
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"fit_images expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    if not isinstance(backbone, Backbone):
        raise TypeError(f"fit_images expects a Backbone (see epviz.load_backbone), got {type(backbone).__name__}")
    if not hasattr(train, "with_transform"):
        raise TypeError(
            f"the per-step protocol augments the image files themselves, so train must be a dataset of files with "
            f"with_transform() (epviz.data.load_split('imagenet:/root', 'train')); got {type(train).__name__}"
        )
    warmup_epochs = default_warmup(epochs) if warmup_epochs is None else warmup_epochs
    norm = backbone.final_norm if norm is None else bool(norm)
    check_fit_options(
        optimizer, precision, epochs, batch_size, warmup_epochs, label_smoothing, None, None, lr=lr, weight_decay=weight_decay
    )
    _check_scale(scale)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0 (0 decodes in the main process), got {num_workers!r}")
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, numbers.Integral) or accum_steps < 1:
        raise ConfigError(
            f"accum_steps must be a positive integer (micro-batches per optimizer step; 1: no accumulation), got {accum_steps!r}"
        )
    accum_steps = int(accum_steps)
    (layer,) = backbone.resolve_layers([layer])
    if probe.dim != backbone.dim:
        raise ConfigError(
            f"probe '{probe.name}' expects tokens of width D={probe.dim} but {backbone.name} gives D={backbone.dim}"
        )
    if probe.needs_prefix and backbone.num_prefix_tokens == 0:
        raise ConfigError(f"probe '{probe.name}' reads prefix tokens ([CLS]) but {backbone.name} has none")
    for what, data in (("train", train), ("validation", val)):
        if data is None:
            continue
        if len(data) == 0:
            raise DataError(f"the {what} set is empty")
        check_labels(data.labels, probe.num_classes, what, f"probe '{probe.name}'")
    if len(train) < 2:
        raise DataError("fit_images needs at least 2 training images (BatchNorm uses batch statistics)")
    check_classes(train.labels, None if val is None else val.labels)
    device = resolve_device(device)
    precision = resolve_precision(device, precision)  # "auto": bf16 only where the device computes it natively
    lr = default_lr(optimizer, batch_size) if lr is None else lr
    recipe = Recipe(epochs, optimizer, warmup_epochs, label_smoothing, None, precision)
    config = dict(
        protocol=PROTOCOL_PER_STEP,
        backbone=backbone.name,
        layer=layer,
        norm=norm,
        **recipe.options(),
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        scale=list(scale),
        device=str(device),
        seed=seed,
        train_size=len(train),
        val_size=None if val is None else len(val),
        probe=dict(probe.config),
    )
    if accum_steps > 1:
        config["accum_steps"] = accum_steps
    world = check_world(batch_size, len(train), accum_steps, "fit_images", config)
    if world > 1:
        config["world_size"] = world
    backbone.model.to(device).eval()
    batches = ImageBatches(
        backbone, train, val, layer, norm, scale, batch_size, accum_steps, num_workers, precision, seed, device
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # one process: the augmentation draws from the global generator in the main process
        return train_one(probe, batches, recipe, config, "fit_images", progress, checkpoint)


class ImageBatches:
    """The engine's batches from images: each step's global batch augmented afresh, cut into micro-batches, tokens by the backbone.

    Every rank draws the same permutation; each micro-batch of each global batch is cut into W contiguous
    slices and rank r reads and augments only its slice (:class:`_MicroBatches`). Validation images get the
    evaluation transform and go through the backbone too, each rank scoring a contiguous shard.
    """

    def __init__(
        self, backbone: Backbone, train, val, layer, norm, scale, batch_size, accum_steps, num_workers, precision, seed, device
    ):
        self.backbone, self.val, self.layer, self.norm = backbone, val, layer, norm
        self.precision, self.device, self.num_workers, self.accum_steps = precision, device, num_workers, accum_steps
        world = world_size() if is_distributed() else 1
        augmented = train.with_transform(train_transform(backbone.image_size[0], scale))
        self.generator = torch.Generator().manual_seed(seed)
        drop_last = len(train) > batch_size
        self.steps_per_epoch = len(train) // batch_size if drop_last else 1
        self.step_size = batch_size if drop_last else len(train)
        per_image = world > 1 or _SEED_EVERY_IMAGE
        # the global batches of DataLoader(shuffle=True, generator=generator), each cut into this rank's micro-batches
        self.sampler = _MicroBatches(
            torch.utils.data.BatchSampler(
                torch.utils.data.RandomSampler(augmented, generator=self.generator), batch_size, drop_last
            ),
            accum_steps,
            keyed=per_image,
        )
        self.loader = torch.utils.data.DataLoader(
            _SeededImages(augmented, seed) if per_image else augmented,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            generator=self.generator,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )
        self.micro_size = batch_size // (accum_steps * world)  # images per forward pass and process (validation too)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chosen block's patch and prefix tokens of `images` (no gradient)."""
        with torch.no_grad(), autocast(self.device, self.precision):
            ((patch, prefix),) = self.backbone.block_tokens(images, [self.layer], self.norm, self.device)
        return patch, (prefix if self.backbone.num_prefix_tokens else None)

    def _micro(self, images: torch.Tensor, labels, weight: float | None = None) -> Micro:
        labels = torch.as_tensor(labels).to(self.device)
        patch, prefix = self.tokens(images)
        return Micro(patch, prefix, labels, slice_weight(len(labels), self.step_size) if weight is None else weight)

    def epoch(self, epoch: int) -> Iterator[Iterator[Micro]]:
        self.sampler.epoch = epoch
        loader = iter(self.loader)
        for _ in range(len(self.loader) // self.accum_steps):
            yield (self._micro(*next(loader)) for _ in range(self.accum_steps))

    def validation(self) -> Iterator[Micro] | None:
        if self.val is None:
            return None
        val = self.val
        if is_distributed():
            val = torch.utils.data.Subset(val, range(*part_bounds(len(val), rank(), world_size())))
        loader = torch.utils.data.DataLoader(val, batch_size=self.micro_size, shuffle=False, num_workers=self.num_workers)
        return (self._micro(images, labels, 1.0) for images, labels in loader)

    def validation_size(self) -> int:
        return 0 if self.val is None else len(self.val)

    def random_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}

    def set_random_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])


def _check_scale(scale) -> None:
    """RandomResizedCrop's area range: two numbers with 0 < low <= high <= 1."""
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale must be (low, high), the crop's share of the image area, got {scale!r}") from None
    if not (0 < low <= high <= 1):
        raise ConfigError(f"scale must satisfy 0 < low <= high <= 1 (reference: (0.08, 1.0)), got {scale!r}")


class _MicroBatches(torch.utils.data.Sampler):
    """This process's micro-batches of every global batch: each cut into `accum_steps` parts, each part into W slices.

    Part ``a`` of a global batch of n samples is ``[a n / k, (a + 1) n / k)`` (k = `accum_steps`), and
    rank r reads slice r of it, so the W ranks together run the micro-batch one process would run.
    With `keyed` the sampler yields ``(epoch, index)`` keys for :class:`_SeededImages` (set
    :attr:`epoch` before each epoch); else plain indices.
    """

    def __init__(self, batches: torch.utils.data.BatchSampler, accum_steps: int, keyed: bool) -> None:
        self.batches, self.accum_steps, self.keyed = batches, accum_steps, keyed
        self.epoch = 0

    def __iter__(self) -> Iterator[list]:
        me, world = rank(), world_size()
        parts = self.accum_steps * world
        for batch in self.batches:
            for a in range(self.accum_steps):
                lo, hi = part_bounds(len(batch), a * world + me, parts)
                part = batch[lo:hi]
                yield [(self.epoch, i) for i in part] if self.keyed else part

    def __len__(self) -> int:
        return len(self.batches) * self.accum_steps


class _SeededImages(torch.utils.data.Dataset):
    """Augmented images whose random draws depend only on (seed, epoch, index), not on who reads them when.

    Args:
        images: The dataset under the random training transform.
        seed: The run's seed.
    """

    def __init__(self, images, seed: int) -> None:
        self.images, self.seed = images, int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        entropy = [self.seed % 2**64, int(epoch), int(index)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]))
            return self.images[index]
