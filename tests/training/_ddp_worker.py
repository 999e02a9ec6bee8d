"""One rank of the two-process runs that tests/training/test_distributed.py compares with one-process runs.

Run as ``python -m tests.training._ddp_worker OUT IMAGES`` with the torchrun variables (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set: the process joins the gloo group through
:func:`epviz.distributed.init_from_env`, runs every scenario of :data:`SCENARIOS` (the same
functions, called in the test's own process, give the one-process references), saves what it got
to ``OUT/rank<r>.pt`` and leaves the group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import epviz.probes as probes
from epviz.backbones import Backbone, load_backbone
from epviz.data import load_split
from epviz.distributed import init_from_env, rank
from epviz.errors import ConfigError
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import FitResult, GridResult, fit, fit_grid, fit_images

D, C = 16, 3
# LARS: a parameter whose gradient is rounding noise (dolg's conv1 bias, right before a BatchNorm) stays put,
# where Adam would turn that noise into steps of size lr that differ with the summation order
FIT = dict(epochs=3, batch_size=16, optimizer="lars", lr=0.5, warmup_epochs=1, progress=False, seed=0)
IMAGES = dict(epochs=2, batch_size=8, optimizer="adamw", lr=1e-2, warmup_epochs=1, precision="fp32", progress=False, seed=0)


def token_set(n: int, seed: int, cache: str | None = None) -> TokenSet:
    """Tokens whose class shows as a shifted direction on one random patch token (a 2 x 2 grid)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, 4, D)).astype(np.float16)
    patch[np.arange(n), rng.integers(0, 4, n), labels] += 4.0
    prefix = rng.normal(size=(n, 1, D)).astype(np.float16)
    return TokenSet(patch, prefix, labels, (2, 2), num_classes=C, origin=TokenOrigin(cache=cache, layer=0))


def tokens() -> tuple[TokenSet, TokenSet]:
    """64 training samples (4 batches of 16) and 29 validation samples (shards of 14 and 15)."""
    return token_set(64, 0), token_set(29, 1)


def build(name: str) -> probes.Probe:
    options: dict[str, Any] = {"ep": dict(num_queries=4), "dolg": dict(grid=(2, 2)), "cae": {}}[name]
    return probes.build(name, D, C, seed=0, **options)


def fit_summary(result: FitResult) -> dict:
    """What the tests compare: the history without wall times, the weights, the best epoch."""
    return dict(
        history=result.history.drop(columns="seconds").to_dict("list"),
        state={k: v.detach().clone() for k, v in result.probe.state_dict().items()},
        best_epoch=result.best_epoch,
        norm_classes=sorted({type(m).__name__ for m in result.probe.modules() if "Norm" in type(m).__name__}),
        config=result.config,
    )


def grid_summary(result: GridResult) -> dict:
    assert result.probes is not None
    return dict(
        history=result.history.to_dict("list"),
        points=result.points.astype({"best_epoch": float}).to_dict("list"),
        states=[{k: v.detach().clone() for k, v in head.state_dict().items()} for head in result.probes],
    )


def fit_dolg() -> dict:
    return fit_summary(fit(build("dolg"), *tokens(), **FIT))


def fit_ep() -> dict:
    return fit_summary(fit(build("ep"), *tokens(), **FIT))


def fit_cae() -> dict:
    """cae keeps a parameter its forward pass never uses: DDP must be told to look for it."""
    return fit_summary(fit(build("cae"), *tokens(), **FIT))


def fit_dolg_unsynced() -> dict:
    """dolg with each rank's BatchNorm left local (the private switch): what the sync prevents."""
    import epviz.training.distributed_fit as distributed_fit

    distributed_fit._SYNC_BATCHNORM = False
    try:
        return fit_summary(fit(build("dolg"), *tokens(), **FIT))
    finally:
        distributed_fit._SYNC_BATCHNORM = True


def fit_odd_batch() -> str:
    try:
        fit(build("ep"), *tokens(), **{**FIT, "batch_size": 15})
    except ConfigError as err:
        return str(err)
    return "no error"


def ranks_disagree() -> list[str]:
    """Rank 1 is given another lr: fit and fit_grid refuse it on every rank, before any step."""
    messages = []
    for run in (
        lambda lr: fit(build("ep"), *tokens(), **{**FIT, "lr": lr}),
        lambda lr: fit_grid("ep", *tokens(), lrs=(lr,), epochs=1, warmup_epochs=0, batch_size=16, progress=False, num_queries=4),
    ):
        try:
            run(0.5 if rank() == 0 else 0.25)
            messages.append("no error")
        except ConfigError as err:
            messages.append(str(err))
    return messages


def grid() -> dict:
    options = dict(lrs=(1e-3, 1e-2), weight_decays=(1e-4,), epochs=3, batch_size=16, warmup_epochs=1, progress=False)
    return grid_summary(fit_grid("ep", *tokens(), keep_all=True, num_queries=4, **options))


def probe_cache() -> dict:
    """fit_or_load twice on tokens with a cache identity: who wrote the entry, who loaded it."""
    from epviz.training import probe_cache as cache

    writes: list[str] = []
    save, write_history = FitResult.save, cache.write_history

    def counted_save(self: FitResult, path: Any) -> Path:
        writes.append("weights")
        return save(self, path)

    def counted_history(*args: Any, **kwargs: Any) -> Path:
        path = write_history(*args, **kwargs)
        if path.is_file():
            writes.append("history")
        return path

    train, val = token_set(64, 0, cache="toy-train"), token_set(29, 1, cache="toy-val")
    FitResult.save = counted_save  # type: ignore[method-assign]
    cache.write_history = counted_history  # type: ignore[assignment]
    try:
        first = cache.fit_or_load(build("ep"), train, val, **{k: v for k, v in FIT.items() if k != "progress"})
        key = first.config.get("cached") or _key(cache, train, val)
        complete = (cache.probe_cache_dir() / f"{key}.json").is_file()
        second = cache.fit_or_load(build("ep"), train, val, **{k: v for k, v in FIT.items() if k != "progress"})
    finally:
        FitResult.save = save  # type: ignore[method-assign]
        cache.write_history = write_history  # type: ignore[assignment]
    return dict(
        writes=writes,
        complete_after_first=complete,
        first_cached="cached" in first.config,
        second_cached=second.config.get("cached"),
    )


def _key(cache: Any, train: TokenSet, val: TokenSet) -> str:
    probe = build("ep")
    options = {k: v for k, v in FIT.items() if k not in ("progress", "seed")}
    return cache.probe_key("ep", probe.config, C, train, val, options, FIT["seed"])


def tiny_backbone() -> Backbone:
    """timm's test_vit with seeded random weights (the same in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_backbone("test_vit", pretrained=False, device="cpu")


def image_sets(root: Path) -> tuple[Any, Any]:
    """18 training images (2 batches of 8) and 6 validation images of write_imagenet's 3 classes."""
    spec = f"imagenet:{root}?resize=80&crop=64"
    return load_split(spec, "train"), load_split(spec, "test")


def without_batchnorm(probe: probes.Probe) -> probes.Probe:
    """The probe with its BatchNorm replaced by the identity: no batch statistics anywhere."""
    probe.norm = torch.nn.Identity()
    return probe


def images_plain(root: Path, accum_steps: int = 2) -> dict:
    """ep without BatchNorm, each image's augmentation seeded by its index: any split of the batch gives the same step."""
    probe = without_batchnorm(probes.build("ep", 64, C, num_queries=4, seed=0))
    return fit_summary(fit_images(probe, tiny_backbone(), *image_sets(root), accum_steps=accum_steps, **IMAGES))


def images_batchnorm(root: Path, accum_steps: int = 2) -> dict:
    """ep with its BatchNorm: statistics of each micro-batch over all ranks."""
    probe = probes.build("ep", 64, C, num_queries=4, seed=0)
    return fit_summary(fit_images(probe, tiny_backbone(), *image_sets(root), accum_steps=accum_steps, **IMAGES))


SCENARIOS: dict[str, Callable[..., Any]] = {
    "fit_dolg": fit_dolg,
    "fit_ep": fit_ep,
    "fit_cae": fit_cae,
    "fit_dolg_unsynced": fit_dolg_unsynced,
    "fit_odd_batch": fit_odd_batch,
    "ranks_disagree": ranks_disagree,
    "grid": grid,
    "probe_cache": probe_cache,
    "images_plain": images_plain,
    "images_batchnorm": images_batchnorm,
}


def main(out: Path, images: Path) -> None:
    torch.set_num_threads(1)
    if not init_from_env(backend="gloo", timeout_minutes=2):
        raise SystemExit("run me with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set")
    try:
        results = {}
        for name, scenario in SCENARIOS.items():
            results[name] = scenario(images) if name.startswith("images") else scenario()
        torch.save(results, out / f"rank{rank()}.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("EPVIZ_DEVICE", "cpu")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
