"""What the Explorer's tests share: small canvas splits and a private token cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def canvas_sets(small_canvases):
    """``canvas_sets(train, val)``: that many train and val canvases (both of train items), the 48 test canvases."""
    from epviz.data import ClutteredFashionMNIST

    def sets(train: int, val: int) -> dict:
        return {
            "train": ClutteredFashionMNIST("train", train, seed=0),
            "val": ClutteredFashionMNIST("train", val, seed=1),
            "test": small_canvases,
        }

    return sets
