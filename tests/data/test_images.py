import numpy as np
import pytest
import torch
from PIL import Image

from epviz.data.images import ImageFileError, ImageFolderDataset, load_image


def save(path, mode="RGB", size=(20, 12)):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def test_rgb_image_loads_as_float_chw(tmp_path):
    img = load_image(save(tmp_path / "a.png"))
    assert img.shape == (3, 12, 20) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1


@pytest.mark.parametrize("mode,word", [("L", "grayscale"), ("RGBA", "RGBA")])
def test_non_rgb_images_are_refused_with_the_fix(tmp_path, mode, word):
    path = save(tmp_path / f"x_{mode}.png", mode)
    with pytest.raises(ImageFileError, match=f"{word}.*convert=True"):
        load_image(path)
    assert load_image(path, convert=True).shape == (3, 12, 20)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = save(tmp_path / "good.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not an image")
    for bad in (cut, junk):
        with pytest.raises(ImageFileError, match=f"{bad.name}.*corrupt or truncated"):
            load_image(bad)
    with pytest.raises(ImageFileError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_image_folder_labels_sorted_classes_and_fingerprint(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            save(tmp_path / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert ds.classes == ["ant", "zebra"] and list(ds.labels) == [0, 0, 0, 1, 1]
    image, label = ds[4]
    assert image.shape == (3, 16, 16) and label == 1
    before = ds.fingerprint()
    save(tmp_path / "ant" / "3.png")
    assert ImageFolderDataset(tmp_path, image_size=16).fingerprint() != before


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "absent")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path)
