"""A new dataset kind is one file: tests/plugins/toy_dataset.py registers "toy", and nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest

import epviz
from epviz.data import ImageDataset, dataset_kind, dataset_kinds, load_split
from tests.plugins import toy_dataset


@pytest.fixture
def toy_root(tmp_path):
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    return tmp_path


def test_the_plugin_kind_is_registered():
    assert "toy" in dataset_kinds()
    assert dataset_kind("toy").opener is toy_dataset.toy_split and dataset_kind("toy").form == "toy:<root>"


def test_load_split_opens_the_plugin_kind_and_it_satisfies_the_protocol(toy_root):
    train = load_split(f"toy:{toy_root}", "train")
    assert isinstance(train, ImageDataset) and len(train) == 12
    assert train.classes == ["circle", "square", "triangle"] and train.num_classes == 3 and train.has_boxes
    image, label = train[5]
    assert image.shape == (3, 32, 32) and label == 2
    x0, y0, x1, y1 = train.box_list(5)[0].astype(int)
    shown = train.display_image(5)
    assert shown.dtype == np.uint8 and shown.shape == (32, 32, 3)
    assert (shown[y0:y1, x0:x1] > 200).all() and (shown < 200).sum() == 3 * (32 * 32 - (x1 - x0) * (y1 - y0))
    small = load_split(f"toy:{toy_root}?n=30&side=48", "val", size=6, seed=1)
    assert len(small) == 6 and np.bincount(small.labels).tolist() == [2, 2, 2] and small.image_size == 48
    assert small.fingerprint() != load_split(f"toy:{toy_root}?n=30&side=48", "val", size=6, seed=2).fingerprint()


def test_a_bad_option_names_the_kinds_options(toy_root):
    with pytest.raises(ValueError, match="unknown option 'crop'.*options of toy: n, side"):
        load_split(f"toy:{toy_root}?crop=3", "train")
    with pytest.raises(ValueError, match="n='many'.*must be int"):
        load_split(f"toy:{toy_root}?n=many", "train")


def test_open_study_builds_the_plugin_kinds_standard_sets(toy_root):
    study = epviz.open_study(["tiny-random"], dataset=f"toy:{toy_root}", tokens=False, setting=epviz.Setting.fast())
    assert set(study.sets) == {"train", "val", "test"}
    assert all(isinstance(ds, toy_dataset.ToyImages) and len(ds) == 12 for ds in study.sets.values())
    assert len({ds.fingerprint()["split"] for ds in study.sets.values()}) == 3
    assert study.describe()["images"] == {"train": 12, "val": 12, "test": 12}
