"""How much disk a token cache needs, checked against the free space before anything is written.

A cache stores, per image, view and layer, the prefix and patch tokens: ``(P + N) x D`` values of
the storage dtype (2 bytes for float16, 4 for float32, 1 for int8 plus one float32 scale per token).
One fp16 layer of ImageNet-1k train at ViT-B/16 is 1,281,167 x 197 x 768 x 2 bytes = 388 GB.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from epviz.errors import ConfigError, StorageError

__all__ = ["STORAGE_DTYPES", "StorageEstimate", "StorageError", "estimate_bytes", "check_free_space", "format_bytes"]

STORAGE_DTYPES = {"float16": 2, "float32": 4, "int8": 1}
_SCALE_BYTES = 4  # int8: one float32 scale per token


@dataclass(frozen=True)
class StorageEstimate:
    """The bytes a cache needs and the bytes free where it goes.

    Attributes:
        needed: Bytes of tokens and labels the cache will hold.
        free: Bytes free on the cache's file system.
        already: Bytes already written by an earlier, interrupted run of the same cache (resumed).
        folder: Where the cache goes.
    """

    needed: int
    free: int
    already: int
    folder: Path

    @property
    def fits(self) -> bool:
        """Whether what remains to be written fits in the free space."""
        return self.needed - self.already <= self.free

    def describe(self) -> str:
        """One line for the log: needed against free."""
        resumed = f" ({format_bytes(self.already)} already written)" if self.already else ""
        return f"token cache: {format_bytes(self.needed)} to store{resumed}, {format_bytes(self.free)} free in {self.folder}"


def format_bytes(count: float) -> str:
    """`count` bytes in B, kB, MB, GB or TB (powers of 1000, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def estimate_bytes(images: int, layers: int, patch_tokens: int, prefix_tokens: int, dim: int, dtype: str, views: int = 1) -> int:
    """Bytes of a cache: images x views x layers x tokens x width x bytes per value (+ int8 scales, labels).

    Args:
        images: Images of the split.
        layers: Stored blocks.
        patch_tokens: N, patch tokens per image.
        prefix_tokens: P, prefix tokens per image ([CLS], registers).
        dim: D, the token width.
        dtype: "float16", "float32" or "int8".
        views: Stored views per image (augmented views; 1 without).
    """
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    tokens = images * views * layers * (patch_tokens + prefix_tokens)
    per_token = dim * STORAGE_DTYPES[dtype] + (_SCALE_BYTES if dtype == "int8" else 0)
    return tokens * per_token + images * 8


def check_free_space(needed: int, folder: str | Path, already: int = 0) -> StorageEstimate:
    """The estimate for `folder`; raises when what remains to be written does not fit.

    Raises:
        StorageError: Less free space than the cache still needs, with the ways out.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    estimate = StorageEstimate(needed=int(needed), free=int(shutil.disk_usage(probe).free), already=int(already), folder=folder)
    if not estimate.fits:
        raise StorageError(
            f"the token cache needs {format_bytes(needed - already)} more but only {format_bytes(estimate.free)} are free in "
            f"{folder}: store fewer layers, use dtype='int8' (half of float16), point EPVIZ_CACHE (or cache_dir) at a larger "
            "disk, or train with the per-step protocol (epviz.training.fit_images), which stores no tokens"
        )
    return estimate
