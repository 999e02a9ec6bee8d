"""Token cache: one backbone pass over a dataset, every requested block, on disk.

``extract_tokens`` runs the frozen backbone once (timm ``forward_intermediates``),
splits patch from prefix tokens, and streams each block's output into ``.npy`` files
(float16 by default; float32, or int8 with a per-token scale), so peak memory does not grow
with the dataset. Before writing it prints the disk the cache needs against the free space,
and refuses when it does not fit (:mod:`epviz.tokens.storage`). Whether the encoder's final
norm is applied to every extracted block follows the backbone's convention by default
(``norm=None``): a preset's ``final_norm``, the reference implementation's convention for
its family (off for MAE, BEiTv2, DINO; on for DINOv2, CLIP, EVA02, SigLIP); off for plain
timm names and the zoo backbones. ``norm=True`` / ``norm=False`` overrides it.

A cache is keyed by everything that changes the tokens: backbone name and weights hash,
layers, dataset fingerprint, input transform, final-norm flag, precision and storage
dtype (and the views, when augmented views are stored). It is written in shards into a
``.partial-shards`` folder, each shard marked complete once its rows are on disk, and the
folder is renamed into place only when every shard is complete (:mod:`epviz.tokens.shards`):
an interrupted run never leaves a cache that reads as complete, and the next call extracts
only the missing shards. Inside a torch.distributed process group (``torchrun``) the ranks
share the shards and every rank returns the same complete cache; read in one process it is
the cache a single process writes. A second call with the same key is a cache hit that
never touches the backbone.

The cache also records which split the images belong to (:func:`dataset_split`, kept in
``meta.json`` and in every TokenSet's ``origin.split``, not part of the key), so that
:func:`epviz.fit` can warn when it would select on test tokens.

Note: cached tokens mean the cheap protocol (no per-step augmentation); the reference
implementation instead runs the backbone on augmented images at every training step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import numbers
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from epviz import distributed
from epviz.atomic import atomic_write_text
from epviz.backbones import Backbone
from epviz.data.images import ImageFileError
from epviz.data.protocol import Fingerprinted, ImageBatches, ImageDataset
from epviz.errors import AnnotationError, ConfigError, DataError, StorageError
from epviz.runtime import PRECISIONS, autocast, resolve_device
from epviz.tokens.quantized import Int8Tokens, quantize
from epviz.tokens.shards import (
    ArraySpec,
    RowWriter,
    ShardPlan,
    check_manifest,
    complete_shards,
    prepare_files,
    read_plan,
    write_marker,
)
from epviz.tokens.storage import STORAGE_DTYPES, check_free_space, estimate_bytes
from epviz.tokens.tokenset import TokenOrigin, TokenSet
from epviz.tokens.views import augmented_batch

__all__ = ["TokenCache", "extract_tokens", "default_cache_dir", "dataset_split", "cache_key", "CACHE_FORMAT"]

CACHE_FORMAT = 1
_PARTIAL = ".partial-"


def default_cache_dir() -> Path:
    """``$EPVIZ_CACHE`` or ``~/.cache/epviz/tokens``."""
    if os.environ.get("EPVIZ_CACHE"):
        return Path(os.environ["EPVIZ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "epviz" / "tokens"


@dataclass
class TokenCache:
    """A complete token cache on disk.

    Attributes:
        path: Its folder.
        meta: The key components and shapes (``meta.json``).
        hit: True when this call found the cache instead of extracting.
    """

    path: Path
    meta: dict
    hit: bool = False

    @classmethod
    def open(cls, path: str | Path, hit: bool = True) -> TokenCache:
        """Open a complete cache folder (raises when it is incomplete)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete token cache (no meta.json); delete it and extract again")
        meta = json.loads(meta_file.read_text())
        if "shards" in meta:  # written by a (possibly distributed) sharded extraction: check its manifest
            shape = _Shapes(meta["num_images"], meta.get("views", 1), meta["num_patches"], meta["num_prefix_tokens"], meta["dim"])
            check_manifest(path, meta, _array_specs(list(meta["layers"]), shape, meta.get("dtype", "float16")))
        return cls(path=path, meta=meta, hit=hit)

    @property
    def layers(self) -> list[int]:
        """The cached block indices (0 is the first block)."""
        return list(self.meta["layers"])

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return tuple(self.meta["backbone"]["grid"])

    @property
    def labels(self) -> np.ndarray:
        """Class labels (n,)."""
        return np.load(self.path / "labels.npy")

    def _check(self, layer: int) -> int:
        layer = layer % self.meta["backbone"]["depth"] if layer < 0 else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this cache (layers {self.layers}); extract it with layers=[..., {layer}]")
        return layer

    @property
    def views(self) -> int:
        """Stored views per image (1 without augmented views)."""
        return int(self.meta.get("views", 1))

    def _array(self, stem: str) -> np.ndarray | Int8Tokens:
        values = np.load(self.path / f"{stem}.npy", mmap_mode="r")
        if self.meta.get("dtype") == "int8":
            return Int8Tokens(values, np.load(self.path / f"{stem}_scale.npy", mmap_mode="r"))
        return values

    def patch(self, layer: int) -> np.ndarray | Int8Tokens:
        """Patch tokens of `layer` as a read-only memory map (n x views, N, D): fp16 or fp32 as stored,
        or for an int8 cache an :class:`~epviz.tokens.quantized.Int8Tokens` that dequantizes on read."""
        return self._array(f"L{self._check(layer):03d}_patch")

    def prefix(self, layer: int) -> np.ndarray | Int8Tokens | None:
        """Prefix tokens of `layer` (n x views, P, D), or None when the backbone has none."""
        stem = f"L{self._check(layer):03d}_prefix"
        return self._array(stem) if (self.path / f"{stem}.npy").is_file() else None

    @property
    def split(self) -> str | None:
        """The split of the cached images (:func:`dataset_split`): from ``meta.json``, else from
        the dataset fingerprint's ``split`` (caches written before the split was recorded)."""
        split = self.meta.get("split")
        if split is None and isinstance(self.meta.get("dataset"), dict):
            split = self.meta["dataset"].get("split")
        return split if isinstance(split, str) else None

    def tokens(self, layer: int, in_memory: bool = False) -> TokenSet:
        """The TokenSet of one layer (memory-mapped unless `in_memory`)."""
        layer = self._check(layer)
        ts = TokenSet(
            patch=self.patch(layer),
            prefix=self.prefix(layer),
            labels=self.labels,
            grid=self.grid,
            num_classes=self.meta.get("dataset_info", {}).get("num_classes"),
            views=self.views,
            origin=TokenOrigin(
                backbone=self.meta["backbone"]["name"],
                layer=layer,
                dataset=self.meta["dataset"],
                cache=self.path.name,
                split=self.split,
            ),
        )
        return ts.load() if in_memory else ts

    def __len__(self) -> int:
        return int(self.meta["num_images"])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def dataset_split(dataset) -> str | None:
    """The split `dataset`'s images belong to, where known (recorded as ``TokenOrigin.split``).

    Ours: a ``standard_split`` attribute (a string) when the dataset declares one; else its
    ``split`` attribute, with ImageNet's official ``"val"`` images read as ``"test"`` (they are
    its test split, the usual test set of probes; epviz's ImageNet ``val`` is held out from the
    official train images, split ``"train"``). The canvases' ``split`` is the Fashion-MNIST item
    split: ``"test"`` for the test canvases, ``"train"`` for the standard train *and* val canvases
    (other canvases of the train items). None when the dataset says nothing.
    """
    declared = getattr(dataset, "standard_split", None)
    if isinstance(declared, str):
        return declared
    split = getattr(dataset, "split", None)
    if not isinstance(split, str):
        return None
    if getattr(dataset, "name", None) == "imagenet" and split == "val":
        return "test"
    return split


def _dataset_fingerprint(dataset, key: dict | None) -> dict:
    if key is not None:
        return dict(key)
    if not isinstance(dataset, Fingerprinted):
        raise TypeError(
            f"{type(dataset).__name__} has no fingerprint(); the token cache needs one to know when tokens are stale. "
            "Give the dataset a fingerprint() method returning a JSON-able dict, or pass dataset_key={...}"
        )
    return dataset.fingerprint()


def cache_key(
    backbone: Backbone, dataset_fingerprint: dict, layers: list[int], norm: bool, precision: str, dtype: str, transform: dict
) -> tuple[str, dict]:
    """The cache key (hex sha256) and the JSON-able components it hashes."""
    parts = {
        "format": CACHE_FORMAT,
        "backbone": {"name": backbone.name, "weights_id": backbone.weights_id},
        "layers": layers,
        "dataset": dataset_fingerprint,
        "transform": transform,
        "norm": bool(norm),
        "precision": precision,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def _image_batches(dataset, batch_size: int, num_workers: int, start: int = 0, end: int | None = None):
    """Yield (images float (B, C, H, W), labels (B,)) of positions [start, end) from any supported dataset."""
    end = len(dataset) if end is None else end
    if isinstance(dataset, ImageBatches):
        labels = torch.as_tensor(dataset.labels)
        for s in range(start, end, batch_size):
            stop = min(s + batch_size, end)
            yield dataset.image_batch(slice(s, stop)), labels[s:stop]
        return
    part = torch.utils.data.Subset(dataset, range(start, end))
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)


def _remove_stale_partials(root: Path, key: str) -> None:
    """Remove the per-process partial folders that earlier versions left (never the resumable shards folder)."""
    for leftover in root.glob(f"*{key[:20]}{_PARTIAL}*"):
        if leftover.name.endswith(f"{_PARTIAL}shards"):
            continue
        pid = leftover.name.rsplit("-", 2)[-2]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            shutil.rmtree(leftover, ignore_errors=True)


def extract_tokens(
    backbone: Backbone,
    dataset,
    layers: int | list[int] | None = None,
    *,
    norm: bool | None = None,
    batch_size: int = 128,
    precision: str = "fp32",
    dtype: str = "float16",
    views: int = 1,
    view_seed: int = 0,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    dataset_key: dict | None = None,
    num_workers: int = 0,
    shard_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenCache:
    """Extract (or find cached) tokens of `layers` for every image of `dataset`.

    Inside an initialised torch.distributed process group (``torchrun``), every rank calls this with
    the same arguments and extracts its shards (see :mod:`epviz.tokens.shards`); every rank returns
    the complete cache. Outside one, the process is a world of one and does everything.

    Args:
        backbone: From :func:`epviz.load_backbone`.
        dataset: Yields (image (3, H, W) float in [0, 1] or uint8, label) and has
            ``fingerprint()``; images are resized to the backbone's input size if needed.
        layers: Block indices (0 = first block, -1 = last); None = every block.
        norm: Apply the encoder's final norm to each block output. None (default): the
            backbone's convention (:attr:`Backbone.final_norm`: a preset's ``final_norm``, else off).
        batch_size: Images per backbone pass.
        precision: "fp32" or "bf16" (autocast); part of the key.
        dtype: Storage dtype: "float16" (default), "float32", or "int8" (per-token scale, half of
            float16; see :mod:`epviz.tokens.quantized`).
        views: Augmented views stored per image (RandomResizedCrop + flip, seeded by image and view;
            see :mod:`epviz.tokens.views`); 1 (default): the un-augmented image only.
        view_seed: Seed of the views (part of the key when views > 1).
        device: None picks CUDA when present (this rank's GPU under torchrun), else CPU.
        cache_dir: Root folder of caches (default :func:`default_cache_dir`).
        dataset_key: Override of ``dataset.fingerprint()``.
        num_workers: DataLoader workers for datasets without a batch fast path.
        shard_size: Images per shard (default: at most 10,000, at least one shard per rank); what a
            re-run after a failure redoes at most.
        overwrite: Extract again even on a hit.
        progress: Show a tqdm bar (and the storage estimate).

    Raises:
        StorageError: Less free disk than the cache needs (checked before writing), or a full disk.
        ConfigError: Bad arguments, more ranks than images, or ranks that disagree on the key.
    """
    layers = backbone.resolve_layers(layers)
    norm = backbone.final_norm if norm is None else bool(norm)
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for arg, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("views", views, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{arg} must be an integer >= {low}, got {value!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: there is nothing to extract")
    world = distributed.world_size()
    dev = resolve_device(device if device is not None or world == 1 else distributed.local_device())
    transform: dict[str, Any] = {
        "resize_to": list(backbone.image_size),
        "interpolation": "bicubic-antialias",
        "mean": list(backbone.mean),
        "std": list(backbone.std),
    }
    if views > 1:
        transform["views"] = {"count": int(views), "seed": int(view_seed), "crop": "random-resized-crop+flip"}
    key, parts = cache_key(backbone, _dataset_fingerprint(dataset, dataset_key), layers, norm, precision, dtype, transform)
    distributed.check_same("the token cache key", (key, n), describe=lambda kn: f"{kn[0][:12]}... for {kn[1]} images")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_slug(backbone.name)}__{_slug(str(parts['dataset'].get('dataset', 'data')))}__{key[:20]}"
    final = root / name
    split = dataset_split(dataset)
    if final.exists() and not overwrite:
        try:
            cache = TokenCache.open(final, hit=True)
            if split is not None:
                cache.meta["split"] = split  # caches written before the split was recorded
            return cache
        except FileNotFoundError:
            distributed.barrier()  # every rank has seen the broken cache before rank 0 removes it
            if distributed.is_main():
                shutil.rmtree(final, ignore_errors=True)
    plan = ShardPlan.for_world(key, n, world, shard_size)
    partial = root / f"{name}{_PARTIAL}shards"
    shape = _Shapes(n, views, backbone.num_patches, backbone.num_prefix_tokens, backbone.dim)
    specs = _array_specs(layers, shape, dtype)
    if overwrite:
        _on_main_then_all(lambda: shutil.rmtree(partial, ignore_errors=True))
    _on_main_then_all(lambda: _prepare(root, key, partial, plan, specs, shape, len(layers), dtype, progress))
    plan = read_plan(partial)
    failure: BaseException | None = None
    try:
        _extract_shards(
            backbone,
            dataset,
            layers,
            partial,
            plan,
            specs,
            shape,
            norm=norm,
            batch_size=batch_size,
            precision=precision,
            dtype=dtype,
            view_seed=view_seed,
            device=dev,
            num_workers=num_workers,
            progress=progress,
        )
    except BaseException as err:  # noqa: BLE001 - every rank learns of the failure below, then it is raised
        failure = err
    errors = distributed.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        if world == 1 and not complete_shards(partial, plan):
            shutil.rmtree(partial, ignore_errors=True)  # nothing worth resuming
        raise failure
    if any(errors):
        bad = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
        raise RuntimeError(f"token extraction failed on another rank ({bad}); run again to extract only the missing shards")

    def finish() -> None:
        missing = sorted(set(range(len(plan.shards))) - complete_shards(partial, plan))
        if missing:
            raise RuntimeError(f"shards {missing} of {partial} are not complete after every rank finished; run again")
        labels = np.load(partial / "labels.npy", mmap_mode="r")
        meta = {
            "num_images": n,
            "views": int(views),
            "layers": layers,
            "num_patches": shape.patch,
            "num_prefix_tokens": shape.prefix,
            "dim": shape.dim,
            "seconds": round(sum(json.loads(m.read_text())["seconds"] for m in (partial / "shards").glob("*.json")), 2),
            "dataset_info": {"num_classes": int(dataset.num_classes) if isinstance(dataset, ImageDataset) else None},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "world_size": world,
            "shards": [list(r) for r in plan.shards],
            "label_range": [int(labels.min()), int(labels.max())] if n else None,
        }
        meta.update(parts, key=key, split=split)
        meta["backbone"] = dict(backbone.describe())
        atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)

    _on_main_then_all(finish)
    return TokenCache.open(final, hit=False)


@dataclass(frozen=True)
class _Shapes:
    images: int
    views: int
    patch: int
    prefix: int
    dim: int


def _array_specs(layers: list[int], shape: _Shapes, dtype: str) -> list[ArraySpec]:
    rows = shape.images * shape.views
    specs = [ArraySpec("labels.npy", "int64", (shape.images,))]
    for layer in layers:
        parts = [("patch", shape.patch)] + ([("prefix", shape.prefix)] if shape.prefix else [])
        for part, tokens in parts:
            specs.append(ArraySpec(f"L{layer:03d}_{part}.npy", dtype, (rows, tokens, shape.dim)))
            if dtype == "int8":
                specs.append(ArraySpec(f"L{layer:03d}_{part}_scale.npy", "float32", (rows, tokens)))
    return specs


def _on_main_then_all(action) -> None:
    """Run `action` on rank 0; every rank raises if it failed (no rank waits forever on a dead one)."""
    error = None
    if distributed.is_main():
        try:
            action()
        except Exception as err:  # noqa: BLE001 - re-raised on rank 0, reported to the others
            error = err
    message = distributed.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")


def _prepare(
    root: Path, key: str, partial: Path, plan: ShardPlan, specs, shape: _Shapes, layers: int, dtype: str, progress: bool
):
    _remove_stale_partials(root, key)
    needed = estimate_bytes(shape.images, layers, shape.patch, shape.prefix, shape.dim, dtype, shape.views)
    already = 0
    if (partial / "plan.json").is_file():
        stored = read_plan(partial)
        if stored.key == plan.key:
            done = complete_shards(partial, stored)
            already = sum(e - s for i, (s, e) in enumerate(stored.shards) if i in done) * needed // max(shape.images, 1)
    estimate = check_free_space(needed, root, already)
    if progress:
        tqdm.write(estimate.describe())
    prepare_files(partial, plan, specs)


def _extract_shards(
    backbone: Backbone,
    dataset,
    layers: list[int],
    folder: Path,
    plan: ShardPlan,
    specs: list[ArraySpec],
    shape: _Shapes,
    *,
    norm: bool,
    batch_size: int,
    precision: str,
    dtype: str,
    view_seed: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
) -> None:
    world, me = distributed.world_size(), distributed.rank()
    todo = [i for i in plan.assigned(me, world) if i not in complete_shards(folder, plan)]
    images = sum(plan.shards[i][1] - plan.shards[i][0] for i in todo)
    desc = f"tokens {backbone.name}" + (f" rank {me}/{world}" if world > 1 else "")
    bar = tqdm(
        total=images, desc=desc, unit="img", disable=not progress or not todo, leave=False, position=me if world > 1 else None
    )
    try:
        for index in todo:
            start, end = plan.shards[index]
            began = time.time()
            _write_shard(
                backbone, dataset, layers, folder, specs, shape, start, end,
                norm=norm, batch_size=batch_size, precision=precision, dtype=dtype, view_seed=view_seed,
                device=device, num_workers=num_workers, bar=bar,
            )  # fmt: skip
            write_marker(folder, plan, index, {"rank": me, "world_size": world, "seconds": round(time.time() - began, 2)})
    finally:
        bar.close()


def _refuse_nonfinite(backbone: Backbone, layer: int, patch: torch.Tensor, dtype: str, offset: int) -> None:
    """Say why a block's tokens are not finite: NaN from the model or its input, or float16 overflow."""
    rows = ~torch.isfinite(patch.float()).flatten(1).all(dim=1)
    if bool(rows.any()):
        first = offset + int(rows.nonzero()[0, 0])
        raise DataError(
            f"block {layer} of {backbone.name} gives NaN or inf tokens (image {first} first, {int(rows.sum())} of the "
            f"{len(rows)} images in its batch) before any storage cast: the backbone's weights or the images hold NaN "
            "or inf; dtype='float32' would store the same NaNs, so check the images (and the weights file)"
        )
    raise OverflowError(
        f"block {layer} of {backbone.name} has token values beyond the float16 range; extract with dtype='float32'"
    )


def _write_shard(
    backbone: Backbone,
    dataset,
    layers: list[int],
    folder: Path,
    specs: list[ArraySpec],
    shape: _Shapes,
    start: int,
    end: int,
    *,
    norm: bool,
    batch_size: int,
    precision: str,
    dtype: str,
    view_seed: int,
    device: torch.device,
    num_workers: int,
    bar,
) -> None:
    """Extract images [start, end) and write their rows in place (every view, layer and part)."""
    model: Any = backbone.model.to(device)  # a timm ViT: forward_intermediates is not nn.Module's
    P, N, D, K = shape.prefix, shape.patch, shape.dim, shape.views
    by_name = {spec.name: spec for spec in specs}
    writers = {name: RowWriter(folder, spec, start if name == "labels.npy" else start * K) for name, spec in by_name.items()}
    done = start
    try:
        with torch.inference_mode(), autocast(device, precision):
            for images, batch_labels in _image_batches(dataset, batch_size, num_workers, start, end):
                b = images.shape[0]
                per_view = []
                for view in range(K):
                    shown = images if K == 1 else augmented_batch(_as_float(images), done, view, view_seed, backbone.image_size)
                    x = backbone.prepare(shown, device)
                    outs = model.forward_intermediates(
                        x,
                        indices=layers,
                        norm=norm,
                        output_fmt="NLC",
                        intermediates_only=True,
                        return_prefix_tokens=True,
                        stop_early=True,
                    )
                    per_view.append(outs)
                for i, layer in enumerate(layers):
                    patch = _image_major([outs[i][0] for outs in per_view])
                    if patch.shape[1:] != (N, D):
                        raise RuntimeError(
                            f"{backbone.name} block {layer} gave tokens {tuple(patch.shape[1:])} per image, expected ({N}, {D})"
                        )
                    _store(writers, f"L{layer:03d}_patch", patch, dtype, backbone, layer, done)
                    if P:
                        prefix = _image_major([outs[i][1] for outs in per_view])
                        _store(writers, f"L{layer:03d}_prefix", prefix, dtype, backbone, layer, done)
                writers["labels.npy"].write(np.asarray(batch_labels, dtype=np.int64))
                done += b
                bar.update(b)
    except (ImageFileError, AnnotationError) as err:  # an unreadable image: fail fast, and say how to leave it out
        raise type(err)(
            f"{err}\n(extract_tokens stops at the first unreadable image; to leave unreadable images out, listed "
            "and never scored, open the dataset with epviz.data.load_split(..., on_error='skip'))"
        ) from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise StorageError(
                f"the disk holding {folder} is full ({err}); the shards written so far are kept and a re-run resumes "
                "after them: free space, or extract fewer layers, or use dtype='int8'"
            ) from err
        raise
    finally:
        for writer in writers.values():
            writer.close()
    if done != end:
        raise RuntimeError(f"the dataset yielded {done - start} images for positions {start}-{end - 1}, expected {end - start}")


def _all_finite(tokens: torch.Tensor) -> bool:
    """Whether every value is finite: one float32 sum (NaN or inf in, NaN or inf out), and the exact
    element-wise test only when the sum is not finite (a float32 sum of huge finite values may overflow)."""
    return bool(torch.isfinite(tokens.sum(dtype=torch.float32))) or bool(torch.isfinite(tokens).all())


def _image_major(per_view: list[torch.Tensor]) -> torch.Tensor:
    """(B * K, ...) rows, image-major (row i * K + v is view v of image i), from K tensors (B, ...)."""
    return per_view[0] if len(per_view) == 1 else torch.stack(per_view, dim=1).flatten(0, 1)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _store(writers: dict, stem: str, tokens: torch.Tensor, dtype: str, backbone: Backbone, layer: int, offset: int) -> None:
    """Cast (or quantize) one block of tokens and append it to its files."""
    if dtype == "int8":
        if not _all_finite(tokens):
            _refuse_nonfinite(backbone, layer, tokens, dtype, offset)
        values, scales = quantize(tokens.float().cpu(), scale_dtype=torch.float32)
        writers[f"{stem}.npy"].write(values.numpy())
        writers[f"{stem}_scale.npy"].write(scales.float().numpy())
        return
    stored = tokens.to(torch.float16 if dtype == "float16" else torch.float32).cpu()  # torch's fp16 cast beats numpy's
    if not _all_finite(stored):
        _refuse_nonfinite(backbone, layer, tokens, dtype, offset)
    writers[f"{stem}.npy"].write(stored.numpy())
