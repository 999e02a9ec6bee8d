"""Token cache: one backbone pass over a dataset, every requested block, on disk.

``extract_tokens`` runs the frozen backbone once (timm ``forward_intermediates``),
splits patch from prefix tokens, and streams each block's output into fp16 ``.npy``
memory maps, so peak memory does not grow with the dataset. Whether the encoder's final
norm is applied to every extracted block follows the backbone's convention by default
(``norm=None``): a preset's ``final_norm``, the reference implementation's convention for
its family (off for MAE, BEiTv2, DINO; on for DINOv2, CLIP, EVA02, SigLIP); off for plain
timm names and the zoo backbones. ``norm=True`` / ``norm=False`` overrides it.

A cache is keyed by everything that changes the tokens: backbone name and weights hash,
layers, dataset fingerprint, input transform, final-norm flag, precision and storage
dtype. It is written into a temporary folder and renamed into place only once complete,
so an interrupted run never leaves a cache that reads as complete; the next call
removes the leftovers and starts again. A second call with the same key is a cache hit
that never touches the backbone.

The cache also records which split the images belong to (:func:`dataset_split`, kept in
``meta.json`` and in every TokenSet's ``origin.split``, not part of the key), so that
:func:`epviz.fit` can warn when it would select on test tokens.

Note: cached tokens mean the cheap protocol (no per-step augmentation); the reference
implementation instead runs the backbone on augmented images at every training step.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import write_array_header_1_0
from numpy.typing import DTypeLike
from tqdm.auto import tqdm

from epviz.atomic import atomic_write_text
from epviz.backbones import Backbone
from epviz.data.images import ImageFileError
from epviz.data.protocol import Fingerprinted, ImageBatches, ImageDataset
from epviz.errors import AnnotationError, ConfigError, DataError
from epviz.runtime import PRECISIONS, autocast, resolve_device
from epviz.tokens.tokenset import TokenOrigin, TokenSet

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
        return cls(path=path, meta=json.loads(meta_file.read_text()), hit=hit)

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

    def patch(self, layer: int) -> np.ndarray:
        """Patch tokens of `layer` as a read-only fp16 memory map (n, N, D)."""
        return np.load(self.path / f"L{self._check(layer):03d}_patch.npy", mmap_mode="r")

    def prefix(self, layer: int) -> np.ndarray | None:
        """Prefix tokens of `layer` (n, P, D), or None when the backbone has none."""
        file = self.path / f"L{self._check(layer):03d}_prefix.npy"
        return np.load(file, mmap_mode="r") if file.is_file() else None

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


def _image_batches(dataset, batch_size: int, num_workers: int):
    """Yield (images float (B, C, H, W), labels (B,)) from any supported dataset."""
    n = len(dataset)
    if isinstance(dataset, ImageBatches):
        labels = torch.as_tensor(dataset.labels)
        for s in range(0, n, batch_size):
            yield dataset.image_batch(slice(s, s + batch_size)), labels[s : s + batch_size]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)


class _NpyStream:
    """Writes an .npy file front to back in batches (sequential writes beat memmap page faults).

    The result is a normal .npy file, read back with ``np.load(..., mmap_mode="r")``.
    """

    def __init__(self, path: Path, dtype: DTypeLike, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape, self.rows = np.dtype(dtype), shape, 0
        self.fh = open(path, "wb")  # noqa: SIM115 - held open while batches stream in; close() ends it
        write_array_header_1_0(self.fh, {"descr": self.dtype.str, "fortran_order": False, "shape": shape})

    def write(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block {block.dtype}{block.shape} does not fit {self.dtype}{self.shape}")
        self.fh.write(np.ascontiguousarray(block).data.cast("B"))  # .data: the array's memoryview
        self.rows += block.shape[0]

    def close(self) -> None:
        self.fh.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"wrote {self.rows} rows into a file of {self.shape[0]}")


def _write_blocks(blocks: list[tuple[_NpyStream, np.ndarray]]) -> None:
    for stream, block in blocks:
        stream.write(block)


def _remove_stale_partials(root: Path, key: str) -> None:
    for leftover in root.glob(f"*{key[:20]}{_PARTIAL}*"):
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
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    dataset_key: dict | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenCache:
    """Extract (or find cached) tokens of `layers` for every image of `dataset`.

    Args:
        backbone: From :func:`epviz.load_backbone`.
        dataset: Yields (image (3, H, W) float in [0, 1] or uint8, label) and has
            ``fingerprint()``; images are resized to the backbone's input size if needed.
        layers: Block indices (0 = first block, -1 = last); None = every block.
        norm: Apply the encoder's final norm to each block output. None (default): the
            backbone's convention (:attr:`Backbone.final_norm`: a preset's ``final_norm``, else off).
        batch_size: Images per backbone pass.
        precision: "fp32" or "bf16" (autocast); part of the key.
        dtype: Storage dtype, "float16" (default) or "float32".
        device: None picks CUDA when present, else CPU.
        cache_dir: Root folder of caches (default :func:`default_cache_dir`).
        dataset_key: Override of ``dataset.fingerprint()``.
        num_workers: DataLoader workers for datasets without a batch fast path.
        overwrite: Extract again even on a hit.
        progress: Show a tqdm bar.
    """
    layers = backbone.resolve_layers(layers)
    norm = backbone.final_norm if norm is None else bool(norm)
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for arg, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{arg} must be an integer >= {low}, got {value!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: there is nothing to extract")
    dev = resolve_device(device)
    transform = {
        "resize_to": list(backbone.image_size),
        "interpolation": "bicubic-antialias",
        "mean": list(backbone.mean),
        "std": list(backbone.std),
    }
    key, parts = cache_key(backbone, _dataset_fingerprint(dataset, dataset_key), layers, norm, precision, dtype, transform)
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
            shutil.rmtree(final, ignore_errors=True)
    _remove_stale_partials(root, key)
    partial = root / f"{name}{_PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        meta = _write(
            backbone,
            dataset,
            layers,
            partial,
            n,
            norm=norm,
            batch_size=batch_size,
            precision=precision,
            dtype=dtype,
            device=dev,
            num_workers=num_workers,
            progress=progress,
        )
        meta.update(parts, key=key, split=split)
        meta["backbone"] = dict(backbone.describe())
        atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return TokenCache.open(final, hit=False)


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


def _write(
    backbone: Backbone,
    dataset,
    layers: list[int],
    folder: Path,
    n: int,
    *,
    norm: bool,
    batch_size: int,
    precision: str,
    dtype: str,
    device: torch.device,
    num_workers: int,
    progress: bool,
) -> dict:
    model: Any = backbone.model.to(device)  # a timm ViT: forward_intermediates is not nn.Module's
    P, N, D = backbone.num_prefix_tokens, backbone.num_patches, backbone.dim
    np_dtype = np.float16 if dtype == "float16" else np.float32
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    patch_maps = {layer: _NpyStream(folder / f"L{layer:03d}_patch.npy", np_dtype, (n, N, D)) for layer in layers}
    prefix_maps = {layer: _NpyStream(folder / f"L{layer:03d}_prefix.npy", np_dtype, (n, P, D)) for layer in layers} if P else {}
    streams = list(patch_maps.values()) + list(prefix_maps.values())
    labels = np.zeros(n, dtype=np.int64)
    start, done = time.time(), 0
    bar = tqdm(total=n, desc=f"tokens {backbone.name}", unit="img", disable=not progress, leave=False)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for images, batch_labels in _image_batches(dataset, batch_size, num_workers):
                x = backbone.prepare(images, device)
                outs = model.forward_intermediates(
                    x,
                    indices=layers,
                    norm=norm,
                    output_fmt="NLC",
                    intermediates_only=True,
                    return_prefix_tokens=True,
                    stop_early=True,
                )
                b = x.shape[0]
                blocks = []
                for layer, (patch, prefix) in zip(layers, outs):
                    if patch.shape[1:] != (N, D):
                        raise RuntimeError(
                            f"{backbone.name} block {layer} gave tokens {tuple(patch.shape)}, expected (B, {N}, {D})"
                        )
                    stored = patch.to(torch_dtype).cpu()  # torch's fp16 cast is much faster than numpy's
                    if not bool(torch.isfinite(stored).all()):
                        _refuse_nonfinite(backbone, layer, patch, dtype, done)
                    blocks.append((patch_maps[layer], stored.numpy()))
                    if P:
                        blocks.append((prefix_maps[layer], prefix.to(torch_dtype).cpu().numpy()))
                _write_blocks(blocks)  # sequential writes: a background writer thread measured no faster here
                labels[done : done + b] = batch_labels.numpy()
                done += b
                bar.update(b)
    except (ImageFileError, AnnotationError) as err:  # an unreadable image: fail fast, and say how to leave it out
        raise type(err)(
            f"{err}\n(extract_tokens stops at the first unreadable image; to leave unreadable images out, listed "
            "and never scored, open the dataset with epviz.data.load_split(..., on_error='skip'))"
        ) from err
    finally:
        bar.close()
        for stream in streams:
            stream.fh.close()
    if done != n:
        raise RuntimeError(f"the dataset yielded {done} images but reports len() == {n}")
    for stream in streams:
        stream.close()
    np.save(folder / "labels.npy", labels)
    num_classes = int(dataset.num_classes) if isinstance(dataset, ImageDataset) else None
    return {
        "num_images": n,
        "layers": layers,
        "num_patches": N,
        "num_prefix_tokens": P,
        "dim": D,
        "seconds": round(time.time() - start, 2),
        "dataset_info": {"num_classes": num_classes},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
