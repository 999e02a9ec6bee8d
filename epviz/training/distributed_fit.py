"""What the trainers share when torchrun starts several processes: batch slices, synced BatchNorm, reductions.

A distributed run trains exactly what one process would train on the same global batch:

* **Slices.** ``batch_size`` stays the global batch. Every rank draws the same permutation from
  the same seeded generator, so every rank sees the same global batches, and rank ``r`` of ``W``
  takes the contiguous part ``[r * n // W, (r + 1) * n // W)`` of each (:func:`part_bounds`; with
  gradient accumulation the batch is first cut into micro-batches, then each micro-batch into
  rank slices).
* **Loss.** Each rank's loss is scaled so that the gradient averaged over the ranks (one all-reduce
  of every gradient, :func:`average_gradients`, what DDP does) is the gradient of the mean loss over
  the global batch (:func:`slice_weight`).
* **BatchNorm.** Every BatchNorm layer of the probe normalises with the statistics of the global
  batch, in the forward and the backward pass (:func:`synced_batchnorm`). ``torch.nn.SyncBatchNorm``
  does this on CUDA, but refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"),
  so gloo runs on CPU use :class:`SyncedBatchNorm`, a BatchNorm whose training-mode statistics go
  through one differentiable all-reduce.
* **Reductions.** Training losses, accuracies and validation sums are all-reduced, so every rank
  holds the same history and selects the same epoch (:func:`global_sums`).

With gradient accumulation (:func:`~epviz.training.fit_images.fit_images`), BatchNorm statistics
are those of each micro-batch over all ranks, so W processes give what one process gives with the
same ``accum_steps``, and the large-batch step exactly only for probes without batch statistics.

Outside a process group of more than one process every helper here acts as for a world of one
(nothing swapped, wrapped or reduced), so single-process runs are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from epviz.distributed import all_reduce_sum, check_same, is_distributed, rank, world_size
from epviz.errors import ConfigError
from epviz.tokens import TokenBatch, TokenSet

__all__ = [
    "SyncedBatchNorm",
    "average_gradients",
    "broadcast_state",
    "check_world",
    "epoch_batches",
    "global_sums",
    "part_bounds",
    "rank_batches",
    "slice_weight",
    "synced_batchnorm",
]

LOCAL_OPTIONS = ("device", "torch_threads")  # a run's options that may differ between ranks
_SYNC_BATCHNORM = True  # False leaves BatchNorm local to each rank (only to show in tests that the sync matters)


def part_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """Start and stop of part `part` when `n` items are cut into `parts` contiguous parts of (nearly) equal size."""
    return part * n // parts, (part + 1) * n // parts


def slice_weight(slice_size: int, step_size: int) -> float:
    """The factor on a rank's mean loss over its slice that makes DDP's average the global batch's mean.

    DDP averages the ranks' gradients; each rank's mean over its `slice_size` samples, times
    ``slice_size * W / step_size``, is its share of the mean over the `step_size` samples of the
    step, so the average is the gradient of that mean. Equal slices give 1 (W ranks) or
    ``1 / accum_steps`` (accumulation); one process without accumulation gives exactly 1.
    """
    return slice_size * world_size() / step_size


def check_world(batch_size: int, train_size: int, accum_steps: int, caller: str, config: Mapping | None = None) -> int:
    """Refuse a global batch that does not cut into ``accum_steps * W`` equal, non-empty parts.

    Args:
        batch_size: The global batch.
        train_size: Number of training samples (a set smaller than one batch is one step of all of them).
        accum_steps: Micro-batches per optimizer step.
        caller: The training function, for messages.
        config: The run's options and data sizes: every rank must hold the same (its ``device`` and
            ``torch_threads`` aside).

    Returns:
        W, the number of processes (1 outside a process group).

    Raises:
        ConfigError: `batch_size` is not a multiple of ``accum_steps * W``, the training set is too
            small to give every rank a sample in every micro-batch, or the ranks were given different `config`.
    """
    world = world_size()
    parts = accum_steps * world
    if batch_size % parts:
        what = f"{world} processes" if accum_steps == 1 else f"accum_steps x processes = {accum_steps} x {world}"
        lower = batch_size // parts * parts
        suggest = f"batch_size={lower} or {lower + parts}" if lower else f"batch_size={parts}"
        raise ConfigError(
            f"{caller}: batch_size={batch_size} is the global batch and must split into equal parts for the {what}: "
            f"pass a multiple of {parts} ({suggest})" + ("" if accum_steps == 1 else ", or change accum_steps")
        )
    step = min(batch_size, train_size)
    if step < parts:
        raise ConfigError(
            f"{caller}: the training set holds {train_size} samples, too few for {parts} non-empty parts "
            f"({world} processes x {accum_steps} micro-batches): use fewer processes or accum_steps"
        )
    if config is not None and world > 1:
        check_same(f"the {caller} options and data sizes", {k: v for k, v in config.items() if k not in LOCAL_OPTIONS})
    return world


def epoch_batches(
    train: TokenSet, epoch: int, seed: int, batch_size: int, generator: torch.Generator, device: torch.device, drop_last: bool
) -> Iterator[tuple[TokenBatch, int]]:
    """One epoch's shuffled batches of this rank, each with the size of its global batch.

    With stored views, each image reads the view drawn for (seed, epoch) (:meth:`TokenSet.for_epoch`).
    One process reads whole batches; a rank of several its slice of each (:func:`rank_batches`).
    """
    views = train.for_epoch(epoch, seed)
    if world_size() == 1 or not is_distributed():
        return (
            (b, len(b.labels))
            for b in views.batches(batch_size, shuffle=True, generator=generator, device=device, drop_last=drop_last)
        )
    return rank_batches(views, batch_size, generator, device, drop_last)


def rank_batches(
    tokens: TokenSet, batch_size: int, generator: torch.Generator, device: torch.device, drop_last: bool
) -> Iterator[tuple[TokenBatch, int]]:
    """This rank's slice of every shuffled global batch, with the size of that global batch.

    The global batches are those of ``tokens.batches(batch_size, shuffle=True, generator=...,
    drop_last=...)``: the same permutation drawn from the same generator, cut the same way; only this
    rank's contiguous part of each is gathered.
    """
    n = len(tokens)
    order = torch.randperm(n, generator=generator).numpy()
    stop = n - n % batch_size if drop_last else n
    me, world = rank(), world_size()
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        lo, hi = part_bounds(len(index), me, world)
        yield tokens.batch(index[lo:hi], device=device), len(index)


def global_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (float64; the values themselves outside a process group)."""
    if not is_distributed():
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return all_reduce_sum(total).tolist()


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace every gradient of `params` by its mean over the ranks, in one all-reduce per dtype and device.

    Parameters without a gradient are left alone; every rank must hold gradients for the same
    parameters (the same heads trained on the same steps). A no-op outside a process group.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    world = world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_state(state: dict[str, torch.Tensor]) -> None:
    """Give every rank rank 0's tensors (in place; a no-op outside a process group)."""
    if not is_distributed():
        return
    for tensor in state.values():
        dist.broadcast(tensor, src=0)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks that gradients flow through: the backward pass sums the gradients over the ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm(_BatchNorm):
    """A BatchNorm whose training-mode statistics are those of the batch summed over every rank.

    It shares its parameters and running statistics with the BatchNorm it stands in for (so an
    optimiser built before the swap keeps working and the original module holds the trained state
    when it is put back). Outside training mode, or outside a process group, it is exactly that
    BatchNorm. In training mode each rank contributes the mean, the sum of squared deviations and
    the count of its slice; one all-reduce, differentiable (its backward pass sums the gradients over
    the ranks), combines them into the global mean and biased variance, which normalise the input
    as BatchNorm does; the running statistics take the unbiased global variance. The gradient is
    that of BatchNorm on the global batch, as with ``torch.nn.SyncBatchNorm``, which refuses CPU
    tensors and so cannot serve gloo runs.

    Args:
        original: The BatchNorm (1d, 2d or 3d) to stand in for.
    """

    def __init__(self, original: _BatchNorm) -> None:
        super().__init__(original.num_features, original.eps, original.momentum, original.affine, original.track_running_stats)
        self.weight, self.bias = original.weight, original.bias
        self.running_mean, self.running_var = original.running_mean, original.running_var
        self.num_batches_tracked = original.num_batches_tracked
        self.train(original.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, ...), got {input.dim()}-D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed()):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = x.numel() // channels if channels else 0
        row = x.new_zeros(2 * channels + 1, dtype=torch.float64)
        if count:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            row = torch.cat([mean.double(), var.double() * count, row.new_full((1,), float(count))])
        me, world = rank(), world_size()
        table = _AllReduceSum.apply(torch.stack([row if r == me else torch.zeros_like(row) for r in range(world)]))
        means, squares, counts = table[:, :channels], table[:, channels : 2 * channels], table[:, 2 * channels :]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        var = (squares + counts * (means - mean) ** 2).sum(dim=0) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        invstd = torch.rsqrt(var + self.eps)
        y = (x - mean.float().view(shape)) * invstd.float().view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def _synced(bn: _BatchNorm, device: torch.device) -> _BatchNorm:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(bn)  # shares bn's parameters and buffers
    return SyncedBatchNorm(bn)


@contextlib.contextmanager
def synced_batchnorm(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Within the block, every BatchNorm of `module` normalises with the statistics of the global batch.

    In a process group of more than one process each BatchNorm is swapped for one that shares its
    parameters and buffers: ``torch.nn.SyncBatchNorm`` on CUDA, :class:`SyncedBatchNorm` elsewhere
    (``torch.nn.SyncBatchNorm`` accepts only accelerator tensors). On leaving the block the original
    modules are put back, holding the trained state, so the module saves, loads and evaluates on one
    process as before. Outside a process group nothing is swapped.
    """
    swapped: list[tuple[nn.Module, str, _BatchNorm]] = []
    if is_distributed() and _SYNC_BATCHNORM:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, (nn.SyncBatchNorm, SyncedBatchNorm)):
                    setattr(parent, name, _synced(child, device))
                    swapped.append((parent, name, child))
    try:
        yield module
    finally:
        for parent, name, original in reversed(swapped):
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
