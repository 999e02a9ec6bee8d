"""TokenSet: patch tokens, prefix tokens and labels of one layer, ready for probes.

A TokenSet is what the probes train and evaluate on. It wraps arrays that are
usually fp16 memory maps written by :func:`epviz.extract_tokens`, and hands out
fp32 torch batches without loading the whole set into memory.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TokenSet", "TokenBatch", "TokenOrigin"]


@dataclass(frozen=True)
class TokenOrigin:
    """Where a TokenSet's tokens come from (carried into result tables and probe-cache keys).

    Attributes:
        backbone: Name of the backbone that produced them.
        layer: Block index (0 = first block).
        dataset: The dataset's fingerprint (or name).
        cache: Name of the token cache folder they were read from; None for tokens built in memory.
        subset: Number of samples when the set is a subset of a cached set (then it has no cache identity).
    """

    backbone: str | None = None
    layer: int | None = None
    dataset: dict | str | None = None
    cache: str | None = None
    subset: int | None = None

    def replace(self, **changes) -> "TokenOrigin":
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


@dataclass
class TokenSet:
    """Tokens of one backbone layer for a whole dataset.

    Attributes:
        patch: Array (N_images, N, D); any numpy array or memmap (fp16 on disk).
        prefix: Array (N_images, P, D) or None when the backbone has no prefix tokens.
        labels: Integer array (N_images,).
        grid: Patch grid (rows, cols) with rows * cols == N.
        num_classes: Number of classes; defaults to max(label) + 1.
        origin: Where the tokens come from (backbone, layer, dataset, cache), carried into results.
    """

    patch: np.ndarray
    prefix: np.ndarray | None
    labels: np.ndarray
    grid: tuple[int, int]
    num_classes: int | None = None
    origin: TokenOrigin = field(default_factory=TokenOrigin)

    def __post_init__(self) -> None:
        if self.patch.ndim != 3:
            raise ValueError(f"patch tokens must be (images, tokens, dim); got shape {tuple(self.patch.shape)}")
        n_images, n_tokens, _ = self.patch.shape
        if len(self.labels) != n_images:
            raise ValueError(f"{len(self.labels)} labels for {n_images} token sets; they must match")
        if self.prefix is not None and self.prefix.shape[0] != n_images:
            raise ValueError(f"prefix tokens cover {self.prefix.shape[0]} images, patch tokens {n_images}")
        if self.prefix is not None and self.prefix.shape[1] == 0:
            self.prefix = None
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.grid[0] * self.grid[1] != n_tokens:
            raise ValueError(f"grid {self.grid} has {self.grid[0] * self.grid[1]} cells but there are {n_tokens} patch tokens")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.num_classes is None:
            self.num_classes = int(self.labels.max()) + 1 if n_images else 0

    def __len__(self) -> int:
        return int(self.patch.shape[0])

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

    def subset(self, index: np.ndarray | list[int]) -> "TokenSet":
        """A TokenSet holding only the given samples (copied into memory)."""
        index = np.sort(np.asarray(index, dtype=np.int64))
        return TokenSet(
            patch=np.asarray(self.patch[index]),
            prefix=None if self.prefix is None else np.asarray(self.prefix[index]),
            labels=self.labels[index],
            grid=self.grid,
            num_classes=self.num_classes,
            origin=self.origin.replace(subset=len(index)),
        )

    def load(self) -> "TokenSet":
        """A copy of this set held in RAM (fast random access; costs N*D*2 bytes per image)."""
        return TokenSet(
            patch=np.ascontiguousarray(self.patch),
            prefix=None if self.prefix is None else np.ascontiguousarray(self.prefix),
            labels=self.labels.copy(),
            grid=self.grid,
            num_classes=self.num_classes,
            origin=self.origin,
        )

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> TokenBatch:
        """Gather the samples at `index` as an fp32 TokenBatch on `device`."""
        index = np.ascontiguousarray(index, dtype=np.int64)  # torch rejects negative strides
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]  # sorted reads are much faster on memory maps
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        patch = torch.from_numpy(np.asarray(self.patch[sorted_index])[inverse]).to(device=device, dtype=torch.float32)
        prefix = None
        if self.prefix is not None:
            prefix = torch.from_numpy(np.asarray(self.prefix[sorted_index])[inverse]).to(device=device, dtype=torch.float32)
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], device=device)
