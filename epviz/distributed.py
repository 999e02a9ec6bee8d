"""The process group every distributed stage shares: torch.distributed, started by torchrun or SLURM.

epviz never schedules processes itself. ``torchrun --nproc_per_node=N`` (or ``srun`` with the
usual ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables) starts
the processes; :func:`init_from_env` joins them into one group (NCCL when the process has a CUDA
device, gloo on CPU), and every stage asks :func:`rank` and :func:`world_size`. Outside a process
group the same code runs as rank 0 of a world of 1, so one code path serves both.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from epviz.errors import ConfigError

__all__ = [
    "TORCHRUN_ENV",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_same",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "local_device",
    "on_main",
    "rank",
    "world_size",
]

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or srun with the torchrun variables set)."""
    return all(os.environ.get(name) for name in TORCHRUN_ENV)


def is_distributed() -> bool:
    """Whether a torch.distributed process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes shared files and prints results."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Join the process group that torchrun (or srun) described in the environment.

    Args:
        backend: "nccl" or "gloo"; None picks NCCL when CUDA is present, else gloo.
        timeout_minutes: How long a collective waits for the other ranks before failing.

    Returns:
        True when this call (or an earlier one) initialised a group; False when the process was not
        launched by torchrun (then everything runs as a world of one).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise ConfigError("torch was built without torch.distributed; run without torchrun, as one process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (``[obj]`` outside a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (`obj` itself outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (returned for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_same(what: str, value: Any, describe: Callable[[Any], str] = repr) -> None:
    """Raise a ConfigError on every rank when the ranks disagree on `value` (for example a cache key).

    Args:
        what: What the value is, for the message ("the token cache key").
        value: This rank's value (picklable, comparable with ==).
        describe: How to show a value in the message.
    """
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        shown = "; ".join(f"rank {r}: {describe(v)}" for r, v in enumerate(values))
        raise ConfigError(
            f"the ranks disagree on {what} ({shown}); every rank must be given the same arguments "
            "(same dataset root, backbone, layers and options)"
        )


def on_main(action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 only (the others get None); for writing shared files."""
    return action() if is_main() else None
