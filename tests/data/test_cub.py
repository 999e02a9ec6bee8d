import numpy as np
import pytest

from epviz.data import load_split
from epviz.data.annotated import AnnotationError
from epviz.data.cub import cub
from epviz.data.images import ImageFileError
from epviz.data.transforms import EvalTransform
from tests.data.formats import write_cub


def test_labels_splits_and_boxes_after_the_transform(tmp_path):
    truth = write_cub(tmp_path)
    train, test = cub(tmp_path, "train"), cub(tmp_path, "test")
    assert len(train) == 6 and len(test) == 6 and train.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    for ds, is_train in ((train, True), (test, False)):
        ids = [int(s.source.split()[-1]) for s in ds.samples]
        assert all(truth[i][2] == is_train for i in ids)
        assert ds.labels.tolist() == [truth[i][0] for i in ids]
        for k, i in enumerate(ids):
            expected = EvalTransform().boxes(np.array([truth[i][1]]), (70, 90))[0]
            assert np.allclose(ds.box_list(k), expected, atol=1e-4)
    image, label = train[0]
    assert image.shape == (3, 224, 224) and label == 0
    x0, y0, x1, y1 = train.box_list(0)[0]
    assert (image[0, int(y0) + 3 : int(y1) - 3, int(x0) + 3 : int(x1) - 3] > 0.6).float().mean() > 0.95


def test_parent_folder_and_spec(tmp_path):
    write_cub(tmp_path / "CUB_200_2011", per_class=10)
    assert len(cub(tmp_path, "test")) == 15
    spec = f"cub:{tmp_path}"
    train, val = load_split(spec, "train"), load_split(spec, "val")
    assert len(val) == 3 and len(train) == 12 and not {s.path for s in train.samples} & {s.path for s in val.samples}


@pytest.mark.parametrize("name", ["bounding_boxes.txt", "train_test_split.txt", "images.txt", "image_class_labels.txt"])
def test_missing_annotation_file_is_named(tmp_path, name):
    write_cub(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(AnnotationError, match=f"{name}.*missing"):
        cub(tmp_path, "train")


def test_incomplete_box_file_and_box_outside_image(tmp_path):
    write_cub(tmp_path)
    lines = (tmp_path / "bounding_boxes.txt").read_text().splitlines()
    (tmp_path / "bounding_boxes.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(AnnotationError, match="no line for image ids \\['1'\\]"):
        cub(tmp_path, "train")
    lines[0] = "1 50.0 10.0 80.0 20.0"  # x + w = 130 > 90 px
    (tmp_path / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    ds = cub(tmp_path, "train")
    with pytest.raises(AnnotationError, match="outside its 90x70 image"):
        ds.box_list(0)


def test_missing_and_undecodable_images(tmp_path):
    write_cub(tmp_path)
    ds = cub(tmp_path, "train")
    ds.samples[1].path.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageFileError, match="corrupt"):
        ds[1]
    ds.samples[1].path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        cub(tmp_path, "train")
