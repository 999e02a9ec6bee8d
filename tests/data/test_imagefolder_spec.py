import pytest

from epviz.data import load_split
from tests.data.formats import write_image


def make(folder, classes=("cat", "dog"), n=5):
    for c in classes:
        for i in range(n):
            write_image(folder / c / f"{i}.png", 40, 30, None, seed=i)


def test_train_val_test_folders_map_directly(tmp_path):
    for split in ("train", "val", "test"):
        make(tmp_path / split)
    sets = {s: load_split(f"imagefolder:{tmp_path}", s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {"train": 10, "val": 10, "test": 10}
    assert sets["test"].root == tmp_path / "test" and sets["test"].classes == ["cat", "dog"]
    assert not sets["train"].has_boxes
    with pytest.raises(ValueError, match="no box annotations"):
        sets["train"].box_list(0)


def test_train_and_val_only_val_is_the_test_set(tmp_path):
    make(tmp_path / "train", n=10)
    make(tmp_path / "val")
    test = load_split(f"imagefolder:{tmp_path}", "test")
    val = load_split(f"imagefolder:{tmp_path}", "val")
    assert test.root == tmp_path / "val" and len(val) == 2 and val.root == tmp_path / "train"


def test_a_plain_folder_of_classes_is_split_without_overlap(tmp_path):
    make(tmp_path, n=10)
    parts = [load_split(f"imagefolder:{tmp_path}", s) for s in ("train", "val", "test")]
    files = [{s.path for s in p.samples} for p in parts]
    assert [len(f) for f in files] == [14, 2, 4]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])


def test_empty_class_folder_and_unknown_test_class(tmp_path):
    make(tmp_path / "train")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        load_split(f"imagefolder:{tmp_path}", "train")
    (tmp_path / "train" / "empty").rmdir()
    make(tmp_path / "test", classes=("cat", "emu"))
    with pytest.raises(ValueError, match="emu"):
        load_split(f"imagefolder:{tmp_path}", "test")
