"""Locate and read the canonical Fashion-MNIST files (IDX format, gzipped or not).

Search order: ``$EPVIZ_DATA``, the user cache (``~/.cache/epviz/fashion-mnist``),
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), then a
download through torchvision into the user cache.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "load_fashion_mnist", "search_dirs", "FashionMNISTNotFound"]

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class FashionMNISTNotFound(FileNotFoundError):
    """The Fashion-MNIST files are in none of the places epviz looks."""


def user_cache_dir() -> Path:
    """epviz's per-user cache folder (``$XDG_CACHE_HOME/epviz`` or ``~/.cache/epviz``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "epviz"


def search_dirs() -> list[Path]:
    """The folders searched for the files, in order."""
    dirs = []
    if os.environ.get("EPVIZ_DATA"):
        env = Path(os.environ["EPVIZ_DATA"])
        dirs += [env / "fashion-mnist", env]
    cache = user_cache_dir() / "fashion-mnist"
    dirs += [cache, cache / "FashionMNIST" / "raw", DEBIAN_DIR]
    return dirs


def _find(stem: str, folder: Path) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, expected_ndim)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(name: str, mtime_ns: int, size: int, expected_ndim: int) -> np.ndarray:
    path = Path(name)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err}; the file is corrupt or truncated, delete it and fetch it again") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8 or data[3] != expected_ndim:
        raise ValueError(f"{path} is not an IDX file of {expected_ndim}-d uint8 data")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expected_ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} values but its header promises {shape}; the file is truncated")
    out = body.reshape(shape)
    out.flags.writeable = False
    return out


def _download(target: Path) -> bool:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available, reported below
        return False


def load_fashion_mnist(split: str, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (n, 28, 28) uint8 and labels (n,) int64 of one split.

    Args:
        split: "train" (60,000 items) or "test" (10,000 items).
        download: Try torchvision's download when no local copy is found.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_stem, lbl_stem = _FILES[split]
    for folder in search_dirs():
        img, lbl = _find(img_stem, folder), _find(lbl_stem, folder)
        if img and lbl:
            images, labels = _read_idx(img, 3), _read_idx(lbl, 1)
            if len(images) != len(labels):
                raise ValueError(f"{img} has {len(images)} images but {lbl} has {len(labels)} labels")
            return images, labels.astype(np.int64)
    if download and _download(user_cache_dir() / "fashion-mnist"):
        return load_fashion_mnist(split, download=False)
    looked = "\n  ".join(str(d) for d in search_dirs())
    raise FashionMNISTNotFound(
        f"Fashion-MNIST ({img_stem}[.gz], {lbl_stem}[.gz]) was not found. Looked in:\n  {looked}\n"
        "Get the files in one of two ways:\n"
        "  1. Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
        "  2. copy the four IDX files (from github.com/zalandoresearch/fashion-mnist) into a folder "
        "and set EPVIZ_DATA to it"
    )
