import numpy as np
import pytest
from PIL import Image

from epviz.data import load_split
from epviz.data.annotated import AnnotationError
from epviz.data.pets import pets, read_trimap
from epviz.data.transforms import EvalTransform
from tests.data.formats import write_pets


def test_labels_classes_masks_and_boxes_from_trimaps(tmp_path):
    truth = write_pets(tmp_path)
    trainval, test = pets(tmp_path, "trainval"), pets(tmp_path, "test")
    assert trainval.classes == ["Abyssinian", "american_bulldog"] and len(trainval) == 4 and len(test) == 4
    for ds, flag in ((trainval, True), (test, False)):
        for k, s in enumerate(ds.samples):
            label, box, in_trainval = truth[s.path.stem]
            assert in_trainval == flag and ds.labels[k] == label
            assert np.allclose(ds.box_list(k), EvalTransform().boxes(np.array([box]), (64, 72))[0], atol=1e-4)
    mask = trainval.mask(0)
    assert mask.shape == (224, 224) and mask.dtype.is_floating_point is False
    x0, y0, x1, y1 = trainval.box_list(0)[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert abs(cols[0] - x0) <= 2 and abs(cols[-1] + 1 - x1) <= 2 and abs(rows[0] - y0) <= 2 and abs(rows[-1] + 1 - y1) <= 2
    record = trainval.sample(0)
    assert record["image"].shape == (3, 224, 224) and record["visible"].all()


def test_trimap_definition_pet_plus_border(tmp_path):
    values = np.array([[1, 2], [3, 2]], np.uint8)
    Image.fromarray(values).save(tmp_path / "t.png")
    assert read_trimap(tmp_path / "t.png").tolist() == [[True, False], [True, False]]
    Image.fromarray(np.array([[0, 7]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(AnnotationError, match="not a Pets trimap"):
        read_trimap(tmp_path / "bad.png")


def test_missing_files(tmp_path):
    write_pets(tmp_path)
    (tmp_path / "annotations" / "trimaps" / "Abyssinian_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="Abyssinian_1.png"):
        pets(tmp_path, "trainval")
    (tmp_path / "annotations" / "test.txt").unlink()
    with pytest.raises(AnnotationError, match="test.txt is missing"):
        pets(tmp_path, "test")


def test_trimap_of_another_size_is_an_error(tmp_path):
    write_pets(tmp_path)
    Image.fromarray(np.full((10, 10), 1, np.uint8)).save(tmp_path / "annotations" / "trimaps" / "Abyssinian_1.png")
    ds = pets(tmp_path, "trainval")
    with pytest.raises(AnnotationError, match="mask .* is 10x10 but its image .* is 72x64"):
        ds.mask(0)


def test_spec_holds_out_val_from_trainval(tmp_path):
    write_pets(tmp_path, per_breed=20)
    spec = f"pets:{tmp_path}"
    train, val, test = (load_split(spec, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 20)
    assert np.bincount(val.labels).tolist() == [1, 1]
