"""Shared fixtures: small datasets, fake Fashion-MNIST files, a tiny timm backbone."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("EPVIZ_DEVICE", "cpu")

import tests.plugins.toy_probe  # noqa: E402,F401


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the (gzipped) IDX format of MNIST."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """EPVIZ_DATA pointing at synthetic files: train items solid white, test items all black."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", np.full((50, 28, 28), 255))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    monkeypatch.setenv("EPVIZ_DATA", str(folder))
    return folder


@pytest.fixture(scope="session")
def small_canvases():
    """48 real cluttered test canvases."""
    from epviz.data import ClutteredFashionMNIST

    return ClutteredFashionMNIST("test", 48, seed=3)


@pytest.fixture(scope="session")
def test_vit_backbone():
    """timm's tiny test_vit (random init, 160 px, 10x10 grid, D=64, 6 blocks)."""
    from epviz.backbones import load_backbone

    return load_backbone("test_vit", pretrained=False, device="cpu")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny tensors, for which one thread is fastest and immune to a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
