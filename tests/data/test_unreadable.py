import numpy as np
import pytest

from epviz.data import SkippedImage, load_split, standard_splits
from epviz.data.images import ImageFileError
from epviz.errors import ConfigError, DataError
from epviz.tokens import extract_tokens
from tests.data.formats import write_image


def folder_with_one_corrupt_file(root, n=4):
    for c in ("cat", "dog"):
        for i in range(n):
            write_image(root / "test" / c / f"{c}{i}.png", 40, 30, (5, 5, 20, 20), seed=i)
        for i in range(2 * n):
            write_image(root / "train" / c / f"{c}{i}.png", 40, 30, (5, 5, 20, 20), seed=10 + i)
    bad = root / "test" / "dog" / "dog2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    return bad


def test_default_fails_fast_and_names_the_file(tmp_path, test_vit_backbone):
    bad = folder_with_one_corrupt_file(tmp_path)
    ds = load_split(f"imagefolder:{tmp_path}", "test")
    assert len(ds) == 8, "opening the split reads no image"
    with pytest.raises(ImageFileError, match=r"(?s)dog2.png cannot be decoded.*on_error='skip'"):
        extract_tokens(test_vit_backbone, ds, [0], cache_dir=tmp_path / "cache", batch_size=3, progress=False)
    assert not list((tmp_path / "cache").iterdir())
    assert bad.exists()


def test_skip_drops_lists_and_never_scores_the_unreadable_image(tmp_path, test_vit_backbone, capsys):
    bad = folder_with_one_corrupt_file(tmp_path)
    full = load_split(f"imagefolder:{tmp_path}", "test")
    ds = load_split(f"imagefolder:{tmp_path}", "test", on_error="skip")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"skipped {bad}: ") and "dog2.png cannot be decoded" in err[0]
    assert err[-1].startswith("1 file skipped of the 8 images of the test split of imagefolder:")
    assert ds.skipped == [SkippedImage(str(bad), ds.skipped[0].reason)]
    assert len(ds) == 7 and bad not in [s.path for s in ds.samples]
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1], "labels stay with their images"
    assert ds.fingerprint() != full.fingerprint(), "a cache of the full split is never reused"
    cache = extract_tokens(test_vit_backbone, ds, [0], cache_dir=tmp_path / "cache", batch_size=3, progress=False)
    assert len(cache) == 7 and cache.patch(0).shape[0] == 7, "no token row for the skipped image"
    np.testing.assert_array_equal(cache.labels, ds.labels)
    last = extract_tokens(test_vit_backbone, ds.subset([6]), [0], cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(cache.patch(0)[6], last.patch(0)[0], err_msg="token row i is dataset image i, nothing shifted")


def test_skip_keeps_the_split_membership_of_the_other_images(tmp_path, capsys):
    folder_with_one_corrupt_file(tmp_path)
    bad = tmp_path / "train" / "cat" / "cat3.png"
    bad.write_bytes(b"")
    train = load_split(f"imagefolder:{tmp_path}", "train")
    val = load_split(f"imagefolder:{tmp_path}", "val")
    sets = standard_splits(f"imagefolder:{tmp_path}", {"train": None, "val": None}, ("train", "val"), on_error="skip")
    assert [s.path for s in sets["val"].samples] == [s.path for s in val.samples]
    assert [s.path for s in sets["train"].samples] == [s.path for s in train.samples if s.path != bad]
    assert "1 file skipped" in capsys.readouterr().err


def test_a_clean_split_is_returned_unchanged(tmp_path, capsys):
    folder_with_one_corrupt_file(tmp_path)
    ds = load_split(f"imagefolder:{tmp_path}", "train", on_error="skip")
    assert len(ds) == 14 and ds.skipped == [] and capsys.readouterr().err == ""


def test_skip_also_leaves_out_an_image_whose_annotation_does_not_fit(tmp_path, capsys):
    from tests.data.formats import write_imagenet

    truth = write_imagenet(tmp_path, layout="flat", boxes="xml")
    stem = sorted(truth)[0]
    xml = tmp_path / "Annotations" / "CLS-LOC" / "val" / f"{stem}.xml"
    xml.write_text(xml.read_text().replace("<width>", "<width>1", 1))  # a <size> of another image
    ds = load_split(f"imagenet:{tmp_path}", "test", on_error="skip")
    assert len(ds) == len(truth) - 1 and stem in ds.skipped[0].file and "says" in ds.skipped[0].reason
    assert "1 file skipped" in capsys.readouterr().err.splitlines()[-1]


def test_on_error_values_and_a_split_with_no_readable_image(tmp_path):
    folder_with_one_corrupt_file(tmp_path)
    with pytest.raises(ConfigError, match="on_error must be 'raise'.*or 'skip'.*'ignore'"):
        load_split(f"imagefolder:{tmp_path}", "test", on_error="ignore")
    for path in (tmp_path / "test").rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 8 images of the test split"):
        load_split(f"imagefolder:{tmp_path}", "test", on_error="skip")
