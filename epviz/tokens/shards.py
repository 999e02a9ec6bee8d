"""Shards of a token cache: the plan, the preallocated files, the per-shard completion markers.

An extraction splits the images into contiguous shards (``shard_size`` images each, the last one
shorter). Shard ``i`` is extracted by rank ``i % world_size``, so one process and N processes write
the same rows. Every array of the cache is one ``.npy`` file, preallocated (sparse) before any rank
writes, and each rank writes its shards' rows in place: read in one process, a distributed cache is
the cache a single process writes, in the same order (byte for byte with the same shard size).

A shard is complete when its marker ``shards/<i>.json`` exists. The marker is written atomically,
after the shard's rows are flushed to disk, names the cache key, so markers of another key in the
same folder are refused, and holds a blake2b checksum of the bytes the shard wrote into each file
(hashed while writing). A re-run (after any failure, kill -9 included) reads the plan and the
markers back and extracts only the shards without a marker, whatever its world size.

The files are ``.npy`` files that numpy reads as they are: :func:`prepare_files` preallocates them
(sparse) with ``numpy.lib.format.open_memmap``, and :func:`read_header` / :func:`check_file` read a
header back and check its dtype, shape and the file's size without reading the data (cheap, done on
every open of a cache); :func:`checksum_rows` rehashes a shard's rows (``epviz cache verify``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tokenize
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from epviz.atomic import atomic_write, atomic_write_text
from epviz.errors import ConfigError, DataError

__all__ = [
    "ShardPlan",
    "ArraySpec",
    "RowWriter",
    "IncompleteCache",
    "DEFAULT_SHARD_SIZE",
    "prepare_files",
    "complete_shards",
    "write_marker",
    "check_manifest",
    "check_file",
    "read_header",
    "checksum_rows",
]

DEFAULT_SHARD_SIZE = 10_000  # images per shard at most: what a re-run may redo after a failure
_HASH_BYTES = 16  # blake2b digest size of the per-shard checksums
_READ_BYTES = 64 * 2**20  # checksum_rows reads this much at a time


class IncompleteCache(DataError):
    """A token cache folder that is not finished: no manifest, a damaged one, or a shard without its marker.

    :func:`epviz.extract_tokens` extracts such a folder again; :meth:`epviz.TokenCache.open` refuses it
    (the message names the folder and the fix).
    """


@dataclass(frozen=True)
class ShardPlan:
    """How a cache's images are cut into shards.

    Attributes:
        key: The cache key every shard belongs to.
        images: Number of images.
        shard_size: Images per shard (the last shard may be shorter).
    """

    key: str
    images: int
    shard_size: int

    @classmethod
    def for_world(cls, key: str, images: int, world: int, shard_size: int | None = None) -> ShardPlan:
        """The default plan: at most :data:`DEFAULT_SHARD_SIZE` images per shard, at least one shard per rank.

        Raises:
            ConfigError: More ranks than images, or a shard size below 1.
        """
        if images < world:
            raise ConfigError(
                f"{world} ranks for {images} images: every rank needs at least one image; "
                f"run with at most {images} processes (torchrun --nproc_per_node)"
            )
        if shard_size is None:
            shard_size = min(math.ceil(images / world), DEFAULT_SHARD_SIZE)
        if int(shard_size) < 1:
            raise ConfigError(f"shard_size must be at least 1 image, got {shard_size}")
        return cls(key=key, images=int(images), shard_size=int(shard_size))

    @property
    def shards(self) -> list[tuple[int, int]]:
        """(start, end) image ranges, in order."""
        return [(s, min(s + self.shard_size, self.images)) for s in range(0, self.images, self.shard_size)]

    def assigned(self, rank: int, world: int) -> list[int]:
        """The shards rank `rank` of `world` extracts: ``i % world == rank``."""
        return [i for i in range(len(self.shards)) if i % world == rank]

    def as_dict(self) -> dict:
        """JSON-able form (``plan.json``)."""
        return asdict(self)


@dataclass(frozen=True)
class ArraySpec:
    """One array file of a cache: its name, dtype and shape (rows first)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the data (the header aside)."""
        return int(self.shape[0]) * self.row_bytes


def read_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and data offset of the ``.npy`` file at `path`, from its header alone.

    Raises:
        DataError: The file is missing, unreadable, not a ``.npy`` file, its header is damaged, or it
            is stored in Fortran order (the message names the file and the fix).
    """
    path = Path(path)
    fix = f"delete {path.parent} and extract again"
    try:
        with open(path, "rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the cache is incomplete; {fix}") from None
    except (OSError, ValueError, SyntaxError, EOFError, tokenize.TokenError) as err:
        raise DataError(f"{path} has a damaged .npy header ({type(err).__name__}: {err}); {fix}") from err
    if fortran:
        raise DataError(f"{path} is stored in Fortran order, which a token cache never writes; {fix}")
    return np.dtype(dtype), tuple(int(d) for d in shape), int(offset)


def check_file(path: Path, spec: ArraySpec) -> int:
    """Check that `path` holds `spec`'s dtype and shape and is exactly as long as they say (no data read).

    Returns:
        The offset of the data in the file.

    Raises:
        DataError: A missing file, a damaged header, another dtype or shape (even of the same byte
            count), or a truncated or overlong file (the message names the file and the fix).
    """
    path = Path(path)
    dtype, shape, offset = read_header(path)
    fix = f"delete {path.parent} and extract again"
    if dtype != np.dtype(spec.dtype) or shape != tuple(spec.shape):
        raise DataError(
            f"{path} holds a {dtype} array of shape {shape} but this cache needs {np.dtype(spec.dtype)} of shape "
            f"{tuple(spec.shape)}: the file was replaced or damaged; {fix}"
        )
    size, expected = path.stat().st_size, offset + spec.nbytes
    if size != expected:
        state = "truncated" if size < expected else "longer than its shape"
        raise DataError(f"{path} is {state} ({size} bytes, its header says {expected}): the file is damaged; {fix}")
    return offset


def checksum_rows(path: Path, spec: ArraySpec, start_row: int, end_row: int) -> str:
    """The blake2b checksum of rows [start_row, end_row) of `path`, as :class:`RowWriter` computes it while writing.

    Raises:
        DataError: The file does not fit `spec` (see :func:`check_file`), or cannot be read.
    """
    offset = check_file(path, spec)
    digest = hashlib.blake2b(digest_size=_HASH_BYTES)
    left = (end_row - start_row) * spec.row_bytes
    try:
        with open(path, "rb") as fh:
            fh.seek(offset + start_row * spec.row_bytes)
            while left > 0:
                chunk = fh.read(min(left, _READ_BYTES))
                if not chunk:
                    raise EOFError(f"the file ends {left} bytes early")
                digest.update(chunk)
                left -= len(chunk)
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}); delete {path.parent} and extract again") from err
    return digest.hexdigest()


def _preallocate(path: str, spec: ArraySpec) -> None:
    """A ``.npy`` file of `spec`'s dtype and shape at `path`, its data sparse (blocks come as rows are written)."""
    array = npy_format.open_memmap(path, mode="w+", dtype=np.dtype(spec.dtype), shape=tuple(spec.shape))
    del array  # unmapped: nothing was written but the header and the file's length


def _plan_path(folder: Path) -> Path:
    return folder / "plan.json"


def _marker_path(folder: Path, index: int) -> Path:
    return folder / "shards" / f"{index:06d}.json"


def prepare_files(folder: Path, plan: ShardPlan, specs: Iterable[ArraySpec]) -> None:
    """Create (or check, on a resumed run) the plan and the preallocated array files in `folder`.

    Called by one process (rank 0) before any rank writes. Each file is created whole (atomically) or
    not at all, so a run killed here leaves no file of the wrong length.

    Raises:
        ConfigError: The folder holds the plan or markers of another key.
        DataError: It holds a file of another dtype or shape, or a damaged one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shards").mkdir(exist_ok=True)
    plan_file = _plan_path(folder)
    if plan_file.is_file():
        stored = json.loads(plan_file.read_text(encoding="utf-8"))
        if stored.get("key") != plan.key or stored.get("images") != plan.images:
            raise ConfigError(
                f"{folder} holds shards of another cache (key {str(stored.get('key'))[:12]}..., {stored.get('images')} images; "
                f"this run: key {plan.key[:12]}..., {plan.images} images): delete the folder and extract again"
            )
        plan = ShardPlan(**stored)  # a resumed run keeps the shard size it started with
    else:
        atomic_write_text(plan_file, json.dumps(plan.as_dict(), indent=1))
    complete_shards(folder, plan)  # refuses markers of another key before anything is written
    for spec in specs:
        path = folder / spec.name
        if path.exists():
            check_file(path, spec)  # a resumed run: the file must be the one this plan preallocated
            continue
        atomic_write(path, functools.partial(_preallocate, spec=spec))


def read_plan(folder: Path) -> ShardPlan:
    """The plan stored in `folder` (the one a resumed run follows)."""
    return ShardPlan(**json.loads(_plan_path(folder).read_text(encoding="utf-8")))


def complete_shards(folder: Path, plan: ShardPlan) -> dict[int, dict]:
    """The markers of the complete shards of `plan` in `folder`, by shard index.

    A marker without checksums (written by an earlier epviz) does not count: its shard is extracted again.

    Raises:
        ConfigError: A marker of another cache key, or one whose range is not the plan's.
    """
    done: dict[int, dict] = {}
    ranges = plan.shards
    for marker in sorted((folder / "shards").glob("*.json")):
        try:
            doc = json.loads(marker.read_text(encoding="utf-8"))
            index = int(marker.stem)
        except (OSError, ValueError) as err:
            raise ConfigError(f"unreadable shard marker {marker} ({err}): delete {folder} and extract again") from err
        if doc.get("key") != plan.key:
            raise ConfigError(
                f"shard marker {marker} belongs to another cache (key {str(doc.get('key'))[:12]}..., this one "
                f"{plan.key[:12]}...): shards of different keys cannot share a folder; delete {folder} and extract again"
            )
        if index >= len(ranges) or tuple(doc.get("range", ())) != ranges[index]:
            raise ConfigError(f"shard marker {marker} does not match the plan {ranges[:3]}...: delete {folder} and extract again")
        if isinstance(doc.get("blake2b"), dict):
            done[index] = doc
    return done


def write_marker(folder: Path, plan: ShardPlan, index: int, info: Mapping) -> None:
    """Mark shard `index` complete (atomically; call after its rows are on disk).

    `info` holds ``blake2b``: the checksum of the rows the shard wrote, per file (:meth:`RowWriter.digest`).
    """
    doc = {"key": plan.key, "range": list(plan.shards[index]), **info}
    atomic_write_text(_marker_path(folder, index), json.dumps(doc, indent=1))


def check_manifest(folder: Path, manifest: Mapping, specs: Iterable[ArraySpec]) -> None:
    """The cheap checks of a complete cache (no data read, no hashing): its shards cover its images, every
    shard has its marker, and every file is the one the manifest lists, with its dtype, shape and length.

    Raises:
        IncompleteCache: A shard's marker is missing (the cache was never finished).
        DataError: The shards do not cover the images, or a file is missing, of another dtype or shape,
            damaged, truncated, or not the list of the manifest (each message names the file and the fix).
    """
    fix = f"delete {folder} and extract again"
    meta_file = folder / "meta.json"
    specs = list(specs)
    shards, images = manifest["shards"], int(manifest["num_images"])
    try:
        bounds = [(int(start), int(end)) for start, end in shards]
    except (TypeError, ValueError):
        bounds = []
    edges = [0] + [end for _, end in bounds]
    if not bounds or edges[-1] != images or any(start != edges[i] or start >= end for i, (start, end) in enumerate(bounds)):
        raise DataError(f"{meta_file} lists shards {str(shards)[:80]} that do not cover its {images} images in order; {fix}")
    for index, (start, end) in enumerate(bounds):
        if not _marker_path(folder, index).is_file():
            raise IncompleteCache(
                f"{folder} is incomplete: its manifest names shard {index} (images {start}-{end - 1}) but the shard's "
                f"marker is missing; {fix}"
            )
    listed = manifest["arrays"]
    if not isinstance(listed, dict) or sorted(listed) != sorted(spec.name for spec in specs):
        names = sorted(listed) if isinstance(listed, dict) else listed
        raise DataError(f"{meta_file} lists the files {names} but its layers and shapes need {[s.name for s in specs]}; {fix}")
    for spec in specs:
        entry = listed[spec.name]
        sums = entry.get("blake2b") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or entry.get("dtype") != spec.dtype
            or list(entry.get("shape", ())) != list(spec.shape)
            or not isinstance(sums, list)
            or len(sums) != len(bounds)
        ):
            raise DataError(
                f"{meta_file} describes {spec.name} as {str(entry)[:120]}, not {spec.dtype} of shape {tuple(spec.shape)} "
                f"with one checksum per shard; {fix}"
            )
        check_file(folder / spec.name, spec)


class RowWriter:
    """Writes rows into a preallocated array file, front to back from a starting row, hashing them as it goes.

    The rows go through ``write`` (not a memory map), so a full disk is an ``OSError`` (ENOSPC), not a SIGBUS.
    """

    def __init__(self, folder: Path, spec: ArraySpec, start_row: int) -> None:
        self.spec, self.row = spec, start_row
        self.offset = check_file(folder / spec.name, spec)
        self.hash = hashlib.blake2b(digest_size=_HASH_BYTES)
        self.fh = open(folder / spec.name, "r+b")  # noqa: SIM115 - held open while the shard's batches stream in
        self.fh.seek(self.offset + start_row * spec.row_bytes)

    def write(self, block: np.ndarray) -> None:
        """Append `block` (rows of the spec's dtype and row shape)."""
        if block.dtype != np.dtype(self.spec.dtype) or block.shape[1:] != self.spec.shape[1:]:
            raise DataError(f"block {block.dtype}{block.shape} does not fit {self.spec.name} {self.spec.dtype}{self.spec.shape}")
        if self.row + len(block) > self.spec.shape[0]:
            raise DataError(f"{len(block)} rows from row {self.row} overflow {self.spec.name} ({self.spec.shape[0]} rows)")
        data = np.ascontiguousarray(block).data.cast("B")
        self.fh.write(data)
        self.hash.update(data)
        self.row += len(block)

    def digest(self) -> str:
        """The blake2b checksum of the rows written so far (what :func:`checksum_rows` gives for them)."""
        return self.hash.hexdigest()

    def close(self) -> None:
        """Flush the rows written to the operating system, then close.

        Not fsynced: the rows survive the death of the process (``kill -9`` included) as soon as
        they are written, and the marker that follows them is what makes the shard count; an fsync
        per shard measured 10% of the extraction throughput.
        """
        self.fh.close()
