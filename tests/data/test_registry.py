"""The dataset registry: kinds, spec parsing, load_split and standard_splits (canvases and kinds on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from epviz import Setting
from epviz.data import (
    DEFAULT_DATASET,
    AnnotatedImages,
    CanvasRecipe,
    ClutteredFashionMNIST,
    DatasetSpec,
    ImageDataset,
    ImageFolderDataset,
    dataset_kind,
    dataset_kinds,
    load_split,
    missing_members,
    parse_spec,
    register_dataset,
    standard_splits,
)
from epviz.data.protocol import IMAGE_DATASET_MEMBERS
from tests.data.formats import write_image


def make_folder(root: Path, classes=("cat", "dog"), n=5) -> Path:
    for c in classes:
        for i in range(n):
            write_image(root / c / f"{i}.png", 40, 30, None, seed=i)
    return root


# --- kinds and specs --------------------------------------------------------------------------


def test_every_built_in_kind_is_registered_with_its_options():
    assert {"cluttered-fashion-mnist", "imagenet", "cub", "pets", "imagefolder"} <= set(dataset_kinds())
    assert dataset_kinds() == sorted(dataset_kinds())
    assert DEFAULT_DATASET == "cluttered-fashion-mnist" and not dataset_kind(DEFAULT_DATASET).needs_root
    assert dataset_kind(DEFAULT_DATASET).draws and not dataset_kind("cub").draws
    assert set(dataset_kind("imagenet").options) == {"resize", "crop", "boxes"}
    assert set(dataset_kind("cub").options) == {"resize", "crop"}
    assert dataset_kind("pets").form == "pets:<root>" and dataset_kind(DEFAULT_DATASET).form == DEFAULT_DATASET


def test_parse_spec_reads_kind_root_and_typed_options(tmp_path):
    spec = parse_spec(f"imagefolder:{tmp_path}?resize=120&crop=96")
    assert spec == DatasetSpec("imagefolder", tmp_path, {"resize": 120, "crop": 96})
    assert (spec.transform.resize, spec.transform.crop) == (120, 96)
    assert str(spec) == f"imagefolder:{tmp_path}?resize=120&crop=96"
    assert parse_spec(DEFAULT_DATASET) == DatasetSpec(DEFAULT_DATASET, None, {})
    assert parse_spec(f"imagenet:{tmp_path}?boxes=/b/LOC_val_solution.csv").options == {"boxes": "/b/LOC_val_solution.csv"}


def test_parse_spec_errors_name_the_problem_and_the_fix(tmp_path):
    cases = [
        ("imagenet-val", ValueError, "unknown dataset 'imagenet-val'.*cluttered-fashion-mnist.*imagenet:<root>"),
        ("cub", ValueError, "names no folder: write 'cub:/path/to/cub'"),
        (f"pets:{tmp_path / 'nowhere'}", FileNotFoundError, "does not exist"),
        (f"cluttered-fashion-mnist:{tmp_path}", ValueError, "takes no folder"),
        (f"cub:{tmp_path}?boxes=x.csv", ValueError, "unknown option 'boxes'.*options of cub: resize, crop"),
        ("cluttered-fashion-mnist?crop=3", ValueError, "unknown option 'crop'.*options of cluttered-fashion-mnist: salience"),
        (f"imagefolder:{tmp_path}?crop=big", ValueError, "crop='big'.*must be int"),
        (f"imagefolder:{tmp_path}?resize=64&crop=96", ValueError, "must not exceed resize"),
    ]
    for spec, error, match in cases:
        with pytest.raises(error, match=match):
            parse_spec(spec)


def test_register_dataset_checks_names_and_refuses_a_taken_one():
    with pytest.raises(ValueError, match="lower case"):
        register_dataset("My:Kind")
    with pytest.raises(ValueError, match="need a type"):
        register_dataset("kind-with-bad-options", options={"n": 3})

    def another_cub(spec, split):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'cub' is already registered by epviz.data.cub.cub_split"):
        register_dataset("cub")(another_cub)
    assert dataset_kind("cub").opener.__module__ == "epviz.data.cub"


# --- the canvases (moved from the notebooks' set-up tests) ----------------------------------------


def test_dataset_seam_rejects_unknown_specs_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="cluttered-fashion-mnist") as err:
        load_split("imagenet-val", "test", 4)
    assert "imagenet-val" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_split(split="validation", size=4)
    with pytest.raises(ValueError, match="unknown dataset"):
        standard_splits("cub200", Setting.fast().sizes)
    with pytest.raises(ValueError, match="unknown splits"):
        standard_splits(DEFAULT_DATASET, Setting.fast().sizes, ("train", "holdout"))
    with pytest.raises(ValueError, match="positive number"):
        load_split(split="train", size=0)


def test_standard_splits_are_deterministic_and_distinct():
    a = load_split(split="val", size=12)
    b = load_split(split="val", size=12)
    train = load_split(split="train", size=12)
    test = load_split(split="test", size=12)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    assert (a.split, a.seed, train.split, train.seed, test.split, test.seed) == ("train", 1, "train", 0, "test", 0)
    assert not torch.equal(a.images, train.images), "val holds other canvases than train"
    shifted = load_split(split="val", size=12, seed=4)
    assert (shifted.split, shifted.seed) == ("train", 5), "val uses seed + 1"


def test_canvas_fingerprints_are_unchanged():
    """Fingerprints key the token caches on disk: they must stay byte-identical."""
    fp = load_split(split="test", size=12, seed=3).fingerprint()
    assert fp == {
        "dataset": "cluttered-fashion-mnist",
        "version": 1,
        "split": "test",
        "size": 12,
        "seed": 3,
        "recipe": fp["recipe"],
        "backgrounds": 18,
    }
    assert fp == ClutteredFashionMNIST("test", 12, seed=3).fingerprint() and len(fp["recipe"]) == 16


def test_fast_sizes_are_small_and_full_sizes_are_the_standard_ones():
    full, fast = Setting.full().sizes, Setting.fast().sizes
    assert dict(full) == {"train": 20_000, "val": 2_000, "test": 4_000}
    assert all(fast[s] < full[s] for s in ("train", "val", "test"))
    sets = standard_splits(DEFAULT_DATASET, fast, splits=("val", "test"))
    assert list(sets) == ["val", "test"]
    assert len(sets["val"]) == fast["val"] and len(sets["test"]) == fast["test"]
    assert sets["val"].fingerprint() == load_split(split="val", size=fast["val"]).fingerprint()


def test_canvases_default_to_the_full_standard_size(monkeypatch):
    made = []

    def record(self, split, size, seed=0, recipe=None):
        made.append((split, size, seed))
        assert recipe == CanvasRecipe(), "the default spec draws the standard canvases"
        self.labels, self.recipe = torch.zeros(1, dtype=torch.int64), recipe

    monkeypatch.setattr(ClutteredFashionMNIST, "__init__", record)
    monkeypatch.setattr(ClutteredFashionMNIST, "__len__", lambda self: 1)
    for split in ("train", "val", "test"):
        load_split(DEFAULT_DATASET, split, seed=2)
    assert made == [("train", 20_000, 2), ("train", 2_000, 3), ("test", 4_000, 2)]


# --- datasets on disk -------------------------------------------------------------------------------


def test_sizes_on_disk_are_balanced_upper_bounds(tmp_path):
    spec = f"imagefolder:{make_folder(tmp_path, n=10)}"
    full = load_split(spec, "train")
    assert isinstance(full, AnnotatedImages) and isinstance(full, ImageDataset) and len(full) == 14
    small = load_split(spec, "train", size=4, seed=1)
    assert np.bincount(small.labels).tolist() == [2, 2]
    assert {s.path for s in small.samples} <= {s.path for s in full.samples}
    assert small.fingerprint() != load_split(spec, "train", size=4, seed=2).fingerprint()
    assert load_split(spec, "train", size=1000).fingerprint() == full.fingerprint()
    sets = standard_splits(spec, {"train": None, "val": None, "test": 3})
    assert {k: len(v) for k, v in sets.items()} == {"train": 14, "val": 2, "test": 3}


def test_a_parsed_spec_loads_like_its_string(tmp_path):
    spec = f"imagefolder:{make_folder(tmp_path)}?crop=32&resize=40"
    a, b = load_split(spec, "test"), load_split(parse_spec(spec), "test")
    assert a.fingerprint() == b.fingerprint() and a[0][0].shape == (3, 32, 32)


def test_a_kind_without_subset_loads_whole_splits_only(tmp_path):
    @register_dataset("plain-folder")
    def plain(spec, split):
        return ImageFolderDataset(spec.folder, image_size=16)

    make_folder(tmp_path, n=2)
    assert len(load_split(f"plain-folder:{tmp_path}", "train", size=10)) == 4
    with pytest.raises(TypeError, match="no subset\\(indices\\) method.*size=None"):
        load_split(f"plain-folder:{tmp_path}", "train", size=2)


def test_a_kind_must_return_an_image_dataset(tmp_path):
    @register_dataset("bare-tensors")
    def bare(spec, split):
        return torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))

    with pytest.raises(
        TypeError,
        match="bare-tensors dataset kind .* returned a TensorDataset, which lacks labels, classes, "
        "num_classes, image_size, has_boxes, box_list, display_image, fingerprint",
    ):
        load_split(f"bare-tensors:{tmp_path}", "train")


def test_the_member_list_matches_the_protocol(tmp_path):
    declared = {n for n in vars(ImageDataset) if not n.startswith("_")} | {"__len__", "__getitem__", "fingerprint"}
    assert set(IMAGE_DATASET_MEMBERS) == declared
    assert missing_members(object()) == list(IMAGE_DATASET_MEMBERS)
    assert missing_members(ImageFolderDataset(make_folder(tmp_path, n=1))) == []


def test_an_empty_split_is_an_error(tmp_path):
    @register_dataset("empty-folder")
    def empty(spec, split):
        return AnnotatedImages("empty-folder", split, [], ["a"], spec.folder)

    with pytest.raises(ValueError, match=f"the val split of empty-folder:{tmp_path} is empty"):
        load_split(f"empty-folder:{tmp_path}", "val")
