"""TokenSet: patch tokens, prefix tokens and labels of one layer, ready for probes.

A TokenSet is what the probes train and evaluate on. It wraps arrays that are
usually fp16 memory maps written by :func:`epviz.extract_tokens` (or int8 tokens with
per-token scales, :class:`~epviz.tokens.quantized.Int8Tokens`), and hands out fp32 torch
batches without loading the whole set into memory.

A set may hold K augmented views per image (``views=K``, see
:data:`epviz.tokens.views.VIEW_PROTOCOL`): it reads view 0 of each image until
:meth:`TokenSet.for_epoch` picks one view per image for an epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
import torch

from epviz.checks import check_int
from epviz.errors import ConfigError, DataError
from epviz.tokens.quantized import Int8Tokens, check_scales

__all__ = ["NonFinite", "TokenArray", "TokenSet", "TokenBatch", "TokenOrigin"]

TokenArray = np.ndarray | Int8Tokens
"""What TokenSet holds as patch and prefix tokens: a float array (or memory map), or int8 tokens."""

_CHUNK_BYTES = 64 * 2**20  # the finiteness scan reads memory maps this much at a time


@dataclass(frozen=True)
class TokenOrigin:
    """Where a TokenSet's tokens come from (carried into result tables and probe-cache keys).

    Attributes:
        backbone: Name of the backbone that produced them.
        layer: Block index (0 = first block).
        dataset: The dataset's fingerprint (or name).
        cache: Name of the token cache folder they were read from; None for tokens built in memory.
        subset: Number of samples when the set is a subset of a cached set (then it has no cache identity).
        split: The split the images belong to, where known ("train", "val", "test", or the dataset's
            own name of it); set by :func:`epviz.extract_tokens` (see
            :func:`epviz.tokens.cache.dataset_split`). :func:`epviz.fit` warns when it selects on
            tokens whose split is "test".
    """

    backbone: str | None = None
    layer: int | None = None
    dataset: dict | str | None = None
    cache: str | None = None
    subset: int | None = None
    split: str | None = None

    def replace(self, **changes) -> TokenOrigin:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The fields as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenBatch:
    """One batch of tokens.

    Attributes:
        patch: Patch tokens, shape (B, N, D).
        prefix: Prefix tokens ([CLS], registers), shape (B, P, D), or None when P == 0.
        labels: Class indices, shape (B,).
        index: Positions of the batch's samples in the TokenSet, shape (B,).
    """

    patch: torch.Tensor
    prefix: torch.Tensor | None
    labels: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class NonFinite:
    """Where a TokenSet holds NaN or inf (see :meth:`TokenSet.find_nonfinite`).

    Attributes:
        first: Position of the first sample with a NaN or inf value.
        part: "patch" or "prefix": which tokens of that sample.
        count: Number of samples with at least one NaN or inf value.
        total: Number of samples in the set.
    """

    first: int
    part: str
    count: int
    total: int


@dataclass
class TokenSet:
    """Tokens of one backbone layer for a whole dataset.

    With ``views`` K > 1, ``patch`` and ``prefix`` hold K rows per image, image-major (row
    ``i * K + v`` is view v of image i), ``labels`` one per image, and ``len()`` counts images.

    The attributes can be reassigned, but every read (:meth:`batch`, :meth:`batches`,
    :meth:`subset`, :meth:`load`, :meth:`find_nonfinite`, :meth:`for_epoch`) first checks that the
    labels, the patch and prefix rows and the grid still agree (a few shape comparisons), and
    raises a DataError saying what disagrees.

    Attributes:
        patch: Array (N_images * views, N, D); any numpy array or memmap (fp16 on disk), or
            :class:`~epviz.tokens.quantized.Int8Tokens`.
        prefix: Array (N_images * views, P, D) of the same kind, or None when the backbone has no prefix tokens.
        labels: Integer array (N_images,).
        grid: Patch grid (rows, cols) with rows * cols == N.
        num_classes: Number of classes; defaults to max(label) + 1.
        origin: Where the tokens come from (backbone, layer, dataset, cache), carried into results.
        views: Stored views per image (1: no augmentation).
    """

    patch: TokenArray
    prefix: TokenArray | None
    labels: np.ndarray
    grid: tuple[int, int]
    num_classes: int | None = None
    origin: TokenOrigin = field(default_factory=TokenOrigin)
    views: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.views, bool) or not isinstance(self.views, numbers.Integral) or self.views < 1:
            raise ConfigError(f"views must be a positive integer (stored views per image), got {self.views!r}")
        self.views = int(self.views)
        self._check_shapes(constructing=True)
        if self.prefix is not None and self.prefix.shape[1] == 0:
            self.prefix = None
        self.labels = np.asarray(self.labels).astype(np.int64, copy=False)
        n_images = len(self.labels)
        if self.num_classes is None:
            self.num_classes = int(self.labels.max()) + 1 if n_images else 0
        else:
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 1:
                raise ConfigError(f"num_classes must be a positive integer (or None: max label + 1), got {self.num_classes!r}")
            self.num_classes = int(self.num_classes)
            if n_images:
                lo, hi = int(self.labels.min()), int(self.labels.max())
                if lo < 0 or hi >= self.num_classes:
                    outside = int(((self.labels < 0) | (self.labels >= self.num_classes)).sum())
                    raise ConfigError(
                        f"the labels range from {lo} to {hi} but num_classes={self.num_classes}: labels must lie in "
                        f"[0, {self.num_classes - 1}] ({outside} of {n_images} samples lie outside); pass the dataset's "
                        "class count as num_classes, or fix the labels"
                    )
        self._finite: NonFinite | None | Literal[False] = False  # False: not scanned yet
        self._on_scan: Callable[[NonFinite | None], None] | None = None  # told each scan's answer (a cache's manifest)
        self._choice: np.ndarray | None = None  # the view each image reads; None: view 0

    def _check_shapes(self, constructing: bool = False) -> None:
        """Check that labels, patch rows, prefix rows and grid agree (at construction, and before every read).

        Raises:
            DataError: Labels, patch or prefix tokens of shapes that do not fit each other.
            ConfigError: A grid that is not (rows, cols) of positive integers covering the patch tokens.
        """
        if getattr(self.patch, "ndim", None) != 3:
            raise DataError(f"patch tokens must be (images, tokens, dim); got shape {tuple(getattr(self.patch, 'shape', ()))}")
        n_rows, n_tokens, _ = self.patch.shape
        labels = self.labels if isinstance(self.labels, np.ndarray) else np.asarray(self.labels)
        if labels.ndim != 1:
            raise DataError(
                f"labels must be one class index per image, shape ({n_rows // self.views},); got shape {labels.shape}"
            )
        n_images = len(labels)
        if self.views == 1 and n_images != n_rows:
            raise DataError(
                f"{n_images} labels for {n_rows} token sets; they must match"
                + ("" if constructing else " (the labels or tokens were replaced after the TokenSet was built: build a new one)")
            )
        if n_rows != n_images * self.views:
            raise DataError(
                f"patch tokens hold {n_rows} rows but {n_images} images with views={self.views} need "
                f"{n_images * self.views} (image-major: row i * {self.views} + v is view v of image i); "
                "pass the views the cache was extracted with, and one label per image"
            )
        kind = labels.dtype.kind
        if labels.size and (kind not in "iufb" or (kind == "f" and not np.all(np.mod(labels, 1) == 0))):
            raise DataError(
                f"labels must be integer class indices, got dtype {labels.dtype}"
                + (" with fractional values" if kind == "f" else "")
            )
        if self.prefix is not None and (getattr(self.prefix, "ndim", None) != 3 or self.prefix.shape[0] != n_rows):
            noun = "images" if self.views == 1 else "rows"
            raise DataError(f"prefix tokens cover {self.prefix.shape[0]} {noun}, patch tokens {n_rows}")
        grid = _as_grid(self.grid)
        if constructing:
            self.grid = grid
        if grid[0] * grid[1] != n_tokens:
            raise ConfigError(
                f"grid {grid} has {grid[0] * grid[1]} cells but there are {n_tokens} patch tokens; "
                "pass the backbone's patch grid (rows, cols) with rows * cols == tokens"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def view_choice(self) -> np.ndarray:
        """The view each image reads, shape (N_images,) (all 0 until :meth:`for_epoch`)."""
        choice = getattr(self, "_choice", None)
        return np.zeros(len(self), dtype=np.int64) if choice is None else choice.copy()

    def rows(self, index: np.ndarray | list[int]) -> np.ndarray:
        """The patch/prefix rows that hold the chosen view of the images at `index`."""
        index = np.asarray(index, dtype=np.int64)
        if self.views == 1:
            return index
        index = np.where(index < 0, index + len(self), index)  # negative positions count from the end, as in numpy
        choice = getattr(self, "_choice", None)
        return index * self.views + (0 if choice is None else choice[index])

    def for_epoch(self, epoch: int, seed: int) -> TokenSet:
        """A shallow copy that reads one view per image for `epoch` (self when views == 1).

        Image i reads view ``numpy.random.default_rng((seed, epoch)).integers(0, views, size=n)[i]``:
        uniform over the views, the same for the same (seed, epoch), independent across epochs.

        Raises:
            ConfigError: A negative or non-integer epoch or seed.
        """
        for name, value in (("epoch", epoch), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        self._check_shapes()
        if self.views == 1:
            return self
        other = copy.copy(self)
        other._choice = np.random.default_rng((int(seed), int(epoch))).integers(0, self.views, size=len(self))
        return other

    @property
    def dim(self) -> int:
        """Token width D."""
        return int(self.patch.shape[2])

    @property
    def num_tokens(self) -> int:
        """Number of patch tokens N."""
        return int(self.patch.shape[1])

    @property
    def num_prefix(self) -> int:
        """Number of prefix tokens P (0 when there are none)."""
        return 0 if self.prefix is None else int(self.prefix.shape[1])

    def subset(self, index: np.ndarray | list[int]) -> TokenSet:
        """A TokenSet holding only the given samples (copied into memory; int8 tokens stay int8).

        With views, it keeps all the views of those images, and the view each one reads.

        Raises:
            ConfigError: An index outside [0, len(self)).
        """
        self._check_shapes()
        index = np.sort(np.asarray(index, dtype=np.int64).reshape(-1))
        if len(index) and (index[0] < 0 or index[-1] >= len(self)):
            raise ConfigError(f"index must lie in [0, {len(self)}); got values from {index[0]} to {index[-1]}")
        rows = index if self.views == 1 else (index[:, None] * self.views + np.arange(self.views)).reshape(-1)
        out = TokenSet(
            patch=_take(self.patch, rows),
            prefix=None if self.prefix is None else _take(self.prefix, rows),
            labels=self.labels[index],
            grid=self.grid,
            num_classes=self.num_classes,
            origin=self.origin.replace(subset=len(index)),
            views=self.views,
        )
        choice = getattr(self, "_choice", None)
        out._choice = None if choice is None else choice[index]
        return out

    def load(self) -> TokenSet:
        """A copy of this set held in RAM (fast random access; costs N*D*2 bytes per image and view
        in fp16, a quarter of fp32 for int8 tokens, which stay int8)."""
        self._check_shapes()
        out = TokenSet(
            patch=_load(self.patch),
            prefix=None if self.prefix is None else _load(self.prefix),
            labels=self.labels.copy(),
            grid=self.grid,
            num_classes=self.num_classes,
            origin=self.origin,
            views=self.views,
        )
        choice = getattr(self, "_choice", None)
        out._choice = None if choice is None else choice.copy()
        return out

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> TokenBatch:
        """Gather the samples at `index` as an fp32 TokenBatch on `device` (with views: each image's chosen view).

        Raises:
            DataError: The labels and tokens no longer agree (replaced after construction), or int8 tokens
                with a negative or non-finite scale.
        """
        self._check_shapes()
        index = np.ascontiguousarray(index, dtype=np.int64)  # torch rejects negative strides
        rows = self.rows(index)
        order = np.argsort(rows, kind="stable")
        sorted_index = rows[order]  # sorted reads are much faster on memory maps
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        patch = _gather(self.patch, sorted_index, inverse, device)
        prefix = None if self.prefix is None else _gather(self.prefix, sorted_index, inverse, device)
        labels = torch.from_numpy(self.labels[index]).to(device)
        return TokenBatch(patch=patch, prefix=prefix, labels=labels, index=torch.from_numpy(index))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[TokenBatch]:
        """Iterate over the set in batches.

        Args:
            batch_size: Samples per batch.
            shuffle: Draw a random order (from `generator`) instead of the stored one.
            generator: Source of randomness for shuffling, for reproducible runs.
            device: Where the batches are placed.
            drop_last: Skip a final batch smaller than `batch_size`.
        """
        batch_size = check_int("batch_size", batch_size, 1)
        self._check_shapes()
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], device=device)

    def find_nonfinite(self, chunk_bytes: int = _CHUNK_BYTES) -> NonFinite | None:
        """Scan every sample once for NaN or inf, a chunk at a time (a memory map is never loaded whole).

        The answer is remembered when the arrays are read-only (memory-mapped caches), since
        they cannot change; arrays that can be written are scanned again on every call. The
        tokens of a :class:`~epviz.TokenCache` also come with the answer remembered in its
        manifest, and tell it each new one. With views, every stored view is scanned, and a
        sample is bad when any of its views is.

        Args:
            chunk_bytes: About how many bytes of tokens to read at a time.

        Returns:
            None when every value is finite, else where the first bad sample is and how many there are.
        """
        self._check_shapes()
        arrays = [("patch", self.patch)] + ([("prefix", self.prefix)] if self.prefix is not None else [])
        frozen = all(not getattr(a, "flags", None) or not a.flags.writeable for _, a in arrays)
        cached = cast("NonFinite | None | Literal[False]", getattr(self, "_finite", False))
        if frozen and cached is not False:
            return cached
        n = int(self.patch.shape[0])  # rows: images * views
        bad = np.zeros(n, dtype=bool)
        first_part = np.full(n, "", dtype=object)
        for part, array in arrays:
            per_sample = max(int(np.prod(array.shape[1:])) * array.dtype.itemsize, 1)
            step = max(1, int(chunk_bytes) // per_sample)
            for start in range(0, n, step):
                chunk = np.asarray(array[start : start + step])
                rows = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
                new = rows & ~bad[start : start + step]
                first_part[start : start + step][new] = part
                bad[start : start + step] |= rows
        found = None
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            part, count = str(first_part[first]), int(bad.sum())
            if self.views > 1:  # rows to images: an image is bad when any of its views is
                first, n, k = first // self.views, len(self), self.views
                part = "patch" if bool(np.any(first_part[first * k : (first + 1) * k] == "patch")) else "prefix"
                count = int(bad.reshape(n, k).any(axis=1).sum())
            found = NonFinite(first=first, part=part, count=count, total=n)
        if frozen:
            self._finite = found
            remember = getattr(self, "_on_scan", None)
            if remember is not None:
                remember(found)
        return found


def _take(array: TokenArray, rows: np.ndarray) -> TokenArray:
    """The rows of `array` in memory: the array's own ``take`` (int8 tokens stay int8), else numpy's gather."""
    if isinstance(array, np.ndarray):
        return np.asarray(array[rows])
    return array.take(rows)


def _load(array: TokenArray) -> TokenArray:
    """`array` held in RAM: its own ``load`` (int8 tokens stay int8), else a contiguous numpy array.

    A memory map is copied (``np.ascontiguousarray`` would return a view of the file)."""
    if isinstance(array, np.ndarray):
        return np.array(array, order="C") if isinstance(array, np.memmap) else np.ascontiguousarray(array)
    return array.load()


def _gather(array: TokenArray, sorted_rows: np.ndarray, inverse: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Rows `sorted_rows` of `array`, put back in request order (`inverse`), as float32 on `device`.

    Int8 tokens travel as int8 and are dequantized on `device` (a quarter of the bytes of float32 to
    copy; on a GPU the product runs there), with the same single float32 product as on the host.
    """
    if isinstance(array, Int8Tokens):
        values = torch.from_numpy(np.asarray(array.values[sorted_rows])[inverse]).to(device)
        scales = np.asarray(array.scales[sorted_rows], dtype=np.float32)[inverse]
        check_scales(scales, array.scales)
        scales = torch.from_numpy(scales).to(device)
        return values.to(torch.float32).mul_(scales.unsqueeze(-1))
    return torch.from_numpy(np.asarray(array[sorted_rows])[inverse]).to(device=device, dtype=torch.float32)


def _as_grid(grid) -> tuple[int, int]:
    """`grid` as (rows, cols) of positive integers, or a ConfigError."""
    try:
        rows, cols = grid
        ok = all(
            not isinstance(g, bool) and isinstance(g, numbers.Real) and float(g).is_integer() and cast(float, g) >= 1
            for g in (rows, cols)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
    return int(rows), int(cols)
