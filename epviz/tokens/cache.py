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
never touches the backbone. Two processes extracting the same cache at once take turns on a
lock file in the cache root (``<name>.partial-lock``, ``fcntl.flock``, held by rank 0 of each
run): the second waits, then finds the first's cache.

The manifest (``meta.json``) records the key and everything it hashes, the backbone's grid and
shapes, and each file's dtype, shape and per-shard blake2b checksums (computed while writing),
under a checksum of its own. Every open checks the manifest, the key against the folder's name,
the grid, every ``.npy`` header's dtype and shape and every file's length (no data read, see
:meth:`TokenCache.open`); :func:`verify_cache` (``epviz cache verify``) rehashes the data. A
missing or damaged manifest is an unfinished cache, which :func:`extract_tokens` extracts again;
any other mismatch is a DataError naming the file.

The cache also records which split the images belong to (:func:`dataset_split`, kept in
``meta.json`` and in every TokenSet's ``origin.split``, not part of the key), so that
:func:`epviz.fit` can warn when it would select on test tokens.

Note: cached tokens mean the cheap protocol (no per-step augmentation); the reference
implementation instead runs the backbone on augmented images at every training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import numbers
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

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
    IncompleteCache,
    RowWriter,
    ShardPlan,
    check_manifest,
    checksum_rows,
    complete_shards,
    prepare_files,
    read_header,
    read_plan,
    write_marker,
)
from epviz.tokens.storage import STORAGE_DTYPES, check_free_space, estimate_bytes
from epviz.tokens.tokenset import NonFinite, TokenOrigin, TokenSet
from epviz.tokens.views import augmented_batch

__all__ = [
    "TokenCache",
    "IncompleteCache",
    "extract_tokens",
    "verify_cache",
    "default_cache_dir",
    "dataset_split",
    "cache_key",
    "CACHE_FORMAT",
]

CACHE_FORMAT = 1
_PARTIAL = ".partial-"
_LOCK = f"{_PARTIAL}lock"  # <cache name>.partial-lock in the cache root: concurrent writers of one cache wait on it
_KEY_SUFFIX = re.compile(r"__([0-9a-f]{20})$")  # a cache folder's name ends with the first 20 hex digits of its key
_MUTABLE = ("split", "finite", "manifest_blake2b")  # manifest entries outside its checksum (may change after extraction)
T = TypeVar("T")


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
        meta: The manifest (``meta.json``): the key and what it hashes (backbone name and weights
            hash, dataset, layers, transform, norm, precision, dtype, views), the backbone's grid and
            shapes, the shards, and each file's dtype, shape and per-shard checksums.
        hit: True when this call found the cache instead of extracting.
    """

    path: Path
    meta: dict
    hit: bool = False

    @classmethod
    def open(cls, path: str | Path, hit: bool = True, *, expect: Mapping[str, Any] | None = None) -> TokenCache:
        """Open a complete cache folder, after cheap checks that read no token data and hash nothing.

        Checked every time: the manifest is whole and unedited (its own checksum), the folder is the one
        its key names, the grid fits the patch tokens, every shard has its marker, and every file has
        the dtype, shape (rows included) and length the manifest gives, read from its ``.npy`` header.
        The data's checksums are checked on demand by :func:`verify_cache` (``epviz cache verify``).

        Args:
            path: The cache folder.
            hit: Recorded as :attr:`hit`.
            expect: Manifest entries the caller needs (``key``, ``grid``, ``num_images``,
                ``num_patches``, ``num_prefix_tokens``, ``dim``): another value is a DataError.

        Raises:
            IncompleteCache: (a DataError) No ``meta.json``, a damaged or edited one, or a shard
                without its marker: the cache was never finished; :func:`extract_tokens` redoes it.
            DataError: A file or the folder that does not match the manifest, or a manifest that does
                not match `expect`; the message names the file and the fix.
        """
        path = Path(path)
        meta = _read_manifest(path)
        meta_file, fix = path / "meta.json", f"delete {path} and extract again"
        try:
            key = str(meta["key"])
            grid = [int(g) for g in meta["backbone"]["grid"]]
            shape = _shapes_of(meta)
            layers = [int(layer) for layer in meta["layers"]]
            if meta["dtype"] not in STORAGE_DTYPES:
                raise ValueError(f"dtype {meta['dtype']!r}")
            specs = _array_specs(layers, shape, meta["dtype"])
            named = _KEY_SUFFIX.search(path.name)
            if named and not key.startswith(named.group(1)):
                raise DataError(
                    f"{meta_file} belongs to the cache of key {key[:20]}... ({meta['backbone'].get('name')}) but the folder "
                    f"{path} is named for key {named.group(1)}...: it holds another cache's tokens (copied or renamed); {fix}"
                )
            if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != shape.patch:
                raise DataError(f"{meta_file} gives the grid {grid} for {shape.patch} patch tokens; {fix}")
            actual = {"key": key, "grid": grid, "num_images": shape.images, "num_patches": shape.patch,
                      "num_prefix_tokens": shape.prefix, "dim": shape.dim}  # fmt: skip
            for name, wanted in (expect or {}).items():
                if actual[name] != wanted:
                    raise DataError(
                        f"{meta_file} records {name} {actual[name]} but {wanted} is asked for: the folder holds another "
                        f"cache's tokens under this cache's name; {fix}"
                    )
            check_manifest(path, meta, specs)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, DataError):
                raise
            raise IncompleteCache(f"{meta_file} lacks or garbles an entry ({type(err).__name__}: {err}); {fix}") from err
        return cls(path=path, meta=meta, hit=hit)

    @property
    def layers(self) -> list[int]:
        """The cached block indices (0 is the first block)."""
        return list(self.meta["layers"])

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        rows, cols = self.meta["backbone"]["grid"]
        return int(rows), int(cols)

    @property
    def labels(self) -> np.ndarray:
        """Class labels (n,), in memory."""
        return np.array(self._map("labels.npy"))

    def _check(self, layer: int) -> int:
        layer = layer % self.meta["backbone"]["depth"] if layer < 0 else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this cache (layers {self.layers}); extract it with layers=[..., {layer}]")
        return layer

    @property
    def views(self) -> int:
        """Stored views per image (1 without augmented views)."""
        return int(self.meta.get("views", 1))

    def _map(self, name: str) -> np.memmap:
        """One file of the cache as a read-only memory map (its header read again: it was checked at open)."""
        path = self.path / name
        dtype, shape, offset = read_header(path)
        try:
            return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
        except (OSError, ValueError) as err:
            raise DataError(f"{path} cannot be mapped ({err}); delete {self.path} and extract again") from err

    def _array(self, stem: str) -> np.ndarray | Int8Tokens:
        values = self._map(f"{stem}.npy")
        if self.meta.get("dtype") == "int8":
            return Int8Tokens(values, self._map(f"{stem}_scale.npy"))
        return values

    def patch(self, layer: int) -> np.ndarray | Int8Tokens:
        """Patch tokens of `layer` as a read-only memory map (n x views, N, D): fp16 or fp32 as stored,
        or for an int8 cache an :class:`~epviz.tokens.quantized.Int8Tokens` that dequantizes on read."""
        return self._array(f"L{self._check(layer):03d}_patch")

    def prefix(self, layer: int) -> np.ndarray | Int8Tokens | None:
        """Prefix tokens of `layer` (n x views, P, D), or None when the backbone has none."""
        stem = f"L{self._check(layer):03d}_prefix"
        return self._array(stem) if int(self.meta["num_prefix_tokens"]) else None

    @property
    def split(self) -> str | None:
        """The split of the cached images (:func:`dataset_split`): from ``meta.json``, else from
        the dataset fingerprint's ``split`` (caches written before the split was recorded)."""
        split = self.meta.get("split")
        if split is None and isinstance(self.meta.get("dataset"), dict):
            split = self.meta["dataset"].get("split")
        return split if isinstance(split, str) else None

    def tokens(self, layer: int, in_memory: bool = False) -> TokenSet:
        """The TokenSet of one layer: read-only, memory-mapped, or held in RAM when `in_memory`.

        Whether the layer's tokens are finite is scanned once per cache and remembered in its manifest
        (with the files' sizes and modification times, so a file changed since is scanned again);
        :func:`epviz.evaluate.ensure_finite` and :func:`epviz.fit` read that answer.
        """
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
        if in_memory:
            ts = ts.load()
            for array in (ts.patch, ts.prefix):
                _freeze(array)  # as read-only as the memory map: the finiteness answer stays true
        ts._finite = self._finite_record(layer)
        ts._on_scan = functools.partial(self._remember_finite, layer)
        return ts

    def _finite_record(self, layer: int) -> NonFinite | None | Literal[False]:
        """The remembered finiteness of `layer` (None: finite), or False when unknown or its files changed since."""
        try:
            record = self.meta.get("finite", {})[f"L{layer:03d}"]
            if record["files"] != _signatures(self.path, _layer_files(self.meta["arrays"], layer)):
                return False
            found = record["nonfinite"]
            return None if found is None else NonFinite(**found)
        except (KeyError, TypeError, ValueError, OSError):
            return False

    def _remember_finite(self, layer: int, found: NonFinite | None) -> None:
        """Record a finiteness scan of `layer` in the manifest (outside its checksum), for the next reader."""
        try:
            record = {"nonfinite": None if found is None else dataclasses.asdict(found)}
            record["files"] = _signatures(self.path, _layer_files(self.meta["arrays"], layer))
            self.meta.setdefault("finite", {})[f"L{layer:03d}"] = record
            meta_file = self.path / "meta.json"
            on_disk = json.loads(meta_file.read_text(encoding="utf-8"))
            if on_disk.get("manifest_blake2b") == self.meta.get("manifest_blake2b"):  # still this cache, not a newer one
                on_disk.setdefault("finite", {})[f"L{layer:03d}"] = record
                atomic_write_text(meta_file, json.dumps(on_disk, indent=1))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # a read-only or vanished folder: only the memo is lost, and the next reader scans again

    def __len__(self) -> int:
        return int(self.meta["num_images"])


def verify_cache(path: str | Path) -> TokenCache:
    """Open a cache (:meth:`TokenCache.open`'s checks) and check every shard of every file against the
    checksum written at extraction (reads the whole cache once: ``epviz cache verify``).

    Returns:
        The cache, when every checksum matches.

    Raises:
        DataError: The first file whose rows do not match (the message names the file, the rows and the fix),
            or any failure of :meth:`TokenCache.open`.
    """
    cache = TokenCache.open(path)
    meta, n = cache.meta, len(cache)
    specs = _array_specs(cache.layers, _shapes_of(meta), meta["dtype"])
    for spec in specs:
        per_image = spec.shape[0] // n  # the views of token files; 1 for the labels
        for (start, end), expected in zip(meta["shards"], meta["arrays"][spec.name]["blake2b"]):
            if checksum_rows(cache.path / spec.name, spec, start * per_image, end * per_image) != expected:
                raise DataError(
                    f"{cache.path / spec.name}: rows {start * per_image}-{end * per_image - 1} (images {start}-{end - 1}) do "
                    f"not match the checksum written at extraction: the file was changed or damaged; delete {cache.path} "
                    "and extract again"
                )
    return cache


def _read_manifest(path: Path) -> dict:
    """``meta.json`` of `path`, whole and unedited (its checksum), else an :class:`IncompleteCache`."""
    meta_file, fix = path / "meta.json", f"delete {path} and extract again"
    if not meta_file.is_file():
        raise IncompleteCache(f"{path} is not a complete token cache (no meta.json); {fix}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IncompleteCache(f"{meta_file} is damaged ({type(err).__name__}: {err}): the cache is not complete; {fix}") from err
    if not isinstance(meta, dict) or "manifest_blake2b" not in meta:
        raise IncompleteCache(f"{meta_file} has no manifest checksum (an unfinished cache, or one of an older epviz); {fix}")
    if meta["manifest_blake2b"] != _manifest_digest(meta):
        raise IncompleteCache(f"{meta_file} does not match its own checksum: the manifest was edited or damaged; {fix}")
    return meta


def _manifest_digest(meta: Mapping[str, Any]) -> str:
    """blake2b of the manifest's entries, all but those that may change after extraction (:data:`_MUTABLE`)."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k not in _MUTABLE}))  # as read back from disk
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def _layer_files(arrays: Mapping[str, Any], layer: int) -> list[str]:
    """The names of the files of `layer` (patch, prefix, int8 scales) among a manifest's arrays."""
    return sorted(name for name in arrays if name.startswith(f"L{layer:03d}_"))


def _signatures(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """Size and modification time (ns) of each file: what tells a finiteness record that its files changed."""
    out = {}
    for name in names:
        stat = (folder / name).stat()
        out[name] = [int(stat.st_size), int(stat.st_mtime_ns)]
    return out


def _freeze(array: np.ndarray | Int8Tokens | None) -> None:
    """Make an in-memory token array read-only (int8 tokens: their values and scales)."""
    for part in (array.values, array.scales) if isinstance(array, Int8Tokens) else (array,):
        if isinstance(part, np.ndarray):
            part.flags.writeable = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def dataset_split(dataset) -> str | None:
    """The split `dataset`'s images belong to, where known (recorded as ``TokenOrigin.split``).

    Ours: a ``standard_split`` attribute (a string) when the dataset declares one (ImageNet's
    official ``"val"`` images declare ``"test"``: epviz's ImageNet ``val`` is held out from the official
    train images); else its ``split`` attribute. The canvases' ``split`` is the Fashion-MNIST item
    split: ``"test"`` for the test canvases, ``"train"`` for the standard train *and* val canvases
    (other canvases of the train items). None when the dataset says nothing.
    """
    declared = getattr(dataset, "standard_split", None)
    if isinstance(declared, str):
        return declared
    split = getattr(dataset, "split", None)
    return split if isinstance(split, str) else None


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
        if leftover.name.endswith((f"{_PARTIAL}shards", _LOCK)):
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
    the complete cache. Outside one, the process is a world of one and does everything. Another
    process extracting the same cache meanwhile is waited for (a file lock), then its cache is a hit.

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
        DataError: The cache's folder holds files that do not match its manifest, or another cache's
            tokens (a copy under this key's name, another grid or size); the message names the file
            and the fix. A folder without a manifest, with a damaged or edited one, or with a shard
            missing its marker is not an error: it is extracted again (with a warning).
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
    shape = _Shapes(n, views, backbone.num_patches, backbone.num_prefix_tokens, backbone.dim)
    expect = {"key": key, "grid": list(backbone.grid), "num_images": n, "num_patches": shape.patch,
              "num_prefix_tokens": shape.prefix, "dim": shape.dim}  # fmt: skip
    with _cache_lock(root / f"{name}{_LOCK}", progress):  # a second writer of this cache waits here, then finds it
        if _on_main_then_all(lambda: not overwrite and _finished(final, expect)):
            cache = TokenCache.open(final, hit=True, expect=expect)
            if split is not None:
                cache.meta["split"] = split  # caches written before the split was recorded
            return cache
        plan = ShardPlan.for_world(key, n, world, shard_size)
        partial = root / f"{name}{_PARTIAL}shards"
        specs = _array_specs(layers, shape, dtype)
        if overwrite:
            _on_main_then_all(lambda: shutil.rmtree(partial, ignore_errors=True))
        _on_main_then_all(lambda: _prepare(root, key, partial, plan, specs, shape, len(layers), dtype, progress))
        plan = read_plan(partial)
        failure: BaseException | None = None
        try:
            run = _Run(norm, batch_size, precision, dtype, view_seed, dev, num_workers)
            _extract_shards(backbone, dataset, layers, partial, plan, specs, shape, run, progress=progress)
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
            markers = complete_shards(partial, plan)
            missing = sorted(set(range(len(plan.shards))) - set(markers))
            if missing:
                raise DataError(
                    f"shards {missing} of {partial} have no completion marker after every rank finished (was the folder "
                    "changed by another process?); run again to extract them"
                )
            labels = np.load(partial / "labels.npy", mmap_mode="r")
            meta: dict[str, Any] = {
                "num_images": n,
                "views": int(views),
                "layers": layers,
                "num_patches": shape.patch,
                "num_prefix_tokens": shape.prefix,
                "dim": shape.dim,
                "seconds": round(sum(float(m.get("seconds", 0.0)) for m in markers.values()), 2),
                "dataset_info": {"num_classes": int(dataset.num_classes) if isinstance(dataset, ImageDataset) else None},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "world_size": world,
                "shards": [list(r) for r in plan.shards],
                "label_range": [int(labels.min()), int(labels.max())] if n else None,
                "arrays": {
                    spec.name: {
                        "dtype": spec.dtype,
                        "shape": list(spec.shape),
                        "blake2b": [markers[i]["blake2b"][spec.name] for i in range(len(plan.shards))],
                    }
                    for spec in specs
                },
            }
            meta.update(parts, key=key, split=split)
            meta["backbone"] = dict(backbone.describe())
            # every token was checked finite as it was stored (_store): remembered with the files' sizes and times
            meta["finite"] = {
                f"L{layer:03d}": {"nonfinite": None, "files": _signatures(partial, _layer_files(meta["arrays"], layer))}
                for layer in layers
            }
            meta["manifest_blake2b"] = _manifest_digest(meta)
            atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(partial, final)

        _on_main_then_all(finish)
        return TokenCache.open(final, hit=False, expect=expect)


@dataclass(frozen=True)
class _Shapes:
    images: int
    views: int
    patch: int
    prefix: int
    dim: int


@dataclass(frozen=True)
class _Run:
    """The extraction options every shard's batches share."""

    norm: bool
    batch_size: int
    precision: str
    dtype: str
    view_seed: int
    device: torch.device
    num_workers: int


def _shapes_of(meta: Mapping[str, Any]) -> _Shapes:
    return _Shapes(
        int(meta["num_images"]), int(meta["views"]), int(meta["num_patches"]), int(meta["num_prefix_tokens"]), int(meta["dim"])
    )


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


def _on_main_then_all(action: Callable[[], T]) -> T:
    """Run `action` on rank 0 and return its result on every rank; every rank raises if it failed (no rank
    waits forever on a dead one)."""
    error, result = None, None
    if distributed.is_main():
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - re-raised on rank 0, reported to the others
            error = err
    message, result = distributed.broadcast_object((None if error is None else f"{type(error).__name__}: {error}", result))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result  # type: ignore[return-value]


def _finished(final: Path, expect: Mapping[str, Any]) -> bool:
    """Whether `final` is a complete cache of `expect` (rank 0). An unfinished one (no manifest, a damaged
    one, a shard without its marker) is removed, to be extracted again; any other mismatch is raised."""
    if not final.exists():
        return False
    try:
        TokenCache.open(final, expect=expect)
    except IncompleteCache as err:
        warnings.warn(f"{err}: extracting it again", stacklevel=5)  # the caller of extract_tokens
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
        return False
    return True


@contextlib.contextmanager
def _cache_lock(path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on `path` while extracting one cache (rank 0 of a run only: the other ranks
    follow rank 0 through the collectives, so the ranks of one run never wait on each other's lock).

    The lock file is removed on release; a waiter that then holds a lock on the removed file tries again,
    so two processes never both hold it. Where the file cannot be created (a read-only cache root, no
    ``fcntl``), nothing can be written there either and no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if not distributed.is_main() or fcntl is None:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                yield
                return
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    tqdm.write(f"token cache: waiting for another process extracting {path.name.removesuffix(_LOCK)}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass  # the holder removed the file as it released it: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _prepare(
    root: Path, key: str, partial: Path, plan: ShardPlan, specs, shape: _Shapes, layers: int, dtype: str, progress: bool
):
    _remove_stale_partials(root, key)
    needed = estimate_bytes(shape.images, layers, shape.patch, shape.prefix, shape.dim, dtype, shape.views)
    already = 0
    if (partial / "plan.json").is_file():
        stored = read_plan(partial)
        if stored.key == plan.key:
            done = complete_shards(partial, stored).keys()
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
    run: _Run,
    *,
    progress: bool,
) -> None:
    world, me = distributed.world_size(), distributed.rank()
    done = complete_shards(folder, plan)
    todo = [i for i in plan.assigned(me, world) if i not in done]
    images = sum(plan.shards[i][1] - plan.shards[i][0] for i in todo)
    desc = f"tokens {backbone.name}" + (f" rank {me}/{world}" if world > 1 else "")
    bar = tqdm(
        total=images, desc=desc, unit="img", disable=not progress or not todo, leave=False, position=me if world > 1 else None
    )
    try:
        for index in todo:
            start, end = plan.shards[index]
            began = time.time()
            sums = _write_shard(backbone, dataset, layers, folder, specs, shape, start, end, run, bar)
            info = {"rank": me, "world_size": world, "seconds": round(time.time() - began, 2), "blake2b": sums}
            write_marker(folder, plan, index, info)
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
    run: _Run,
    bar,
) -> dict[str, str]:
    """Extract images [start, end) and write their rows in place (every view, layer and part).

    Returns:
        The blake2b checksum of the rows written, per file.
    """
    device, dtype, view_seed = run.device, run.dtype, run.view_seed
    backbone.model.to(device)
    P, N, D, K = shape.prefix, shape.patch, shape.dim, shape.views
    by_name = {spec.name: spec for spec in specs}
    writers = {name: RowWriter(folder, spec, start if name == "labels.npy" else start * K) for name, spec in by_name.items()}
    done = start
    try:
        with torch.inference_mode(), autocast(device, run.precision):
            for images, batch_labels in _image_batches(dataset, run.batch_size, run.num_workers, start, end):
                b = images.shape[0]
                per_view = []
                for view in range(K):
                    shown = images if K == 1 else augmented_batch(_as_float(images), done, view, view_seed, backbone.image_size)
                    per_view.append(backbone.block_tokens(shown, layers, run.norm, device))
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
    return {name: writer.digest() for name, writer in writers.items()}


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
