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
    assert img.shape == (3, 12, 20) and img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1


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


# --- 16-bit, alpha and transparency ------------------------------------------------------------

from PIL import Image as _Image  # noqa: E402

from epviz.data.annotated import AnnotatedImages, Sample  # noqa: E402
from epviz.data.images import ALPHA_BACKGROUND, MAX_PIXELS, read_image, read_image_size  # noqa: E402
from epviz.data.transforms import EvalTransform  # noqa: E402
from epviz.errors import DataError  # noqa: E402
from tests.data.formats import write_grey_png, write_image  # noqa: E402


def pixels(tensor):
    return (tensor * 255).round().to(torch.int64)


def test_16_bit_greyscale_png_keeps_its_relative_intensities(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32)[None, :].repeat(4, 0) * 257).astype(np.uint16)  # 0, 257, ..., 65535
    ramp[0, :3] = (128, 129, 385)  # rounding of value / 257: 0.498 -> 0, 0.502 -> 1, 1.498 -> 1
    _Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with _Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode.startswith("I"), "the fixture must be a true 16-bit PNG"
    with pytest.raises(ImageFileError, match="ramp16.png is a 16-bit grayscale image.*convert=True"):
        load_image(tmp_path / "ramp16.png")
    out = pixels(load_image(tmp_path / "ramp16.png", convert=True))
    assert out.shape == (3, 4, 256) and (out[0] == out[1]).all() and (out[0] == out[2]).all()
    assert out[0, 1].tolist() == list(range(256)), "value v * 257 becomes v: the 16-bit range maps onto 0..255"
    assert out[0, 0, :3].tolist() == [0, 1, 1]
    assert (out < 255).float().mean() > 0.99, "not the all-white image of a clipped conversion"


def test_32_bit_images_outside_16_bits_and_float_images_are_refused(tmp_path):
    _Image.fromarray(np.full((4, 5), 70000, dtype=np.int32), mode="I").save(tmp_path / "wide.tif")
    _Image.fromarray(np.full((4, 5), 0.5, dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(ImageFileError, match="wide.tif holds 32-bit integer samples from 70000 to 70000"):
        load_image(tmp_path / "wide.tif", convert=True)
    with pytest.raises(ImageFileError, match="float.tif holds 32-bit float samples"):
        load_image(tmp_path / "float.tif", convert=True)
    _Image.fromarray(np.full((4, 5), 65535, dtype=np.int32), mode="I").save(tmp_path / "in_range.tif")
    assert pixels(load_image(tmp_path / "in_range.tif", convert=True)).unique().tolist() == [255]


def test_rgba_is_composited_on_the_mean_colour(tmp_path):
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (250, 10, 10)
    rgba[:2, :, 3] = 255  # opaque
    rgba[2:4, :, 3] = 0  # transparent: its colour underneath must not show
    rgba[4:, :, 3] = 128  # half
    _Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = pixels(load_image(tmp_path / "rgba.png", convert=True))
    background = torch.tensor(ALPHA_BACKGROUND)
    assert (out[:, 0].t() == torch.tensor([250, 10, 10])).all()
    assert (out[:, 2].t() == background).all()
    expected = (torch.tensor([250.0, 10, 10]) * 128 / 255 + background * 127 / 255).round()
    assert (out[:, 5].t() == expected).all()


def test_palette_and_colour_key_transparency_is_composited(tmp_path):
    index = np.zeros((4, 6), dtype=np.uint8)
    index[:2] = 1
    pal = _Image.fromarray(index, "P")
    pal.putpalette([0, 0, 0, 20, 200, 30] + [0] * 762)
    pal.save(tmp_path / "palette.png", transparency=0)  # palette entry 0 is transparent (tRNS)
    out = pixels(load_image(tmp_path / "palette.png", convert=True))
    assert (out[:, 0].t() == torch.tensor([20, 200, 30])).all() and (out[:, 3].t() == torch.tensor(ALPHA_BACKGROUND)).all()
    rgb = np.full((4, 6, 3), 90, dtype=np.uint8)
    rgb[:2] = (255, 0, 255)
    _Image.fromarray(rgb).save(tmp_path / "keyed.png", transparency=(255, 0, 255))  # an RGB colour key
    out = pixels(load_image(tmp_path / "keyed.png"))
    assert (out[:, 0].t() == torch.tensor(ALPHA_BACKGROUND)).all() and (out[:, 3] == 90).all()


def test_every_loader_applies_the_alpha_policy(tmp_path):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white under a transparent alpha
    (tmp_path / "cat").mkdir()
    _Image.fromarray(rgba, "RGBA").save(tmp_path / "cat" / "a.png")
    folder = ImageFolderDataset(tmp_path, image_size=16, convert=True)
    annotated = AnnotatedImages("x", "test", [Sample(tmp_path / "cat" / "a.png", 0)], ["cat"], tmp_path)
    for image in (folder[0][0], annotated[0][0]):
        assert (pixels(image).flatten(1).t() == torch.tensor(ALPHA_BACKGROUND)).all()


# --- huge images ----------------------------------------------------------------------------


def old_path(path):
    """What the loaders did before: a full decode, PIL's convert("RGB"), then the transform."""
    with _Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return EvalTransform()(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0).image


def test_normal_images_give_exactly_the_old_transform_output(tmp_path):
    files = [
        write_image(tmp_path / "a.jpg", 500, 375, (40, 30, 300, 200), seed=1),
        write_image(tmp_path / "b.png", 333, 500, (10, 10, 100, 480), seed=2),
        write_image(tmp_path / "c.jpg", 2047, 1500, (500, 300, 1600, 1200), seed=3),
    ]
    _Image.fromarray(np.random.default_rng(4).integers(0, 255, (240, 320), dtype=np.uint8)).save(tmp_path / "d.jpg")
    files.append(tmp_path / "d.jpg")
    opaque = np.random.default_rng(5).integers(0, 255, (200, 260, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    _Image.fromarray(opaque, "RGBA").save(tmp_path / "e.png")
    files.append(tmp_path / "e.png")
    ds = AnnotatedImages("x", "test", [Sample(p, 0) for p in files], ["c"], tmp_path)
    for i, path in enumerate(files):
        assert torch.equal(ds[i][0], old_path(path)), path.name


@pytest.mark.parametrize("suffix,size,reduced", [("jpg", (4200, 2200), (2100, 1100)), ("png", (2100, 2048), (1050, 1024))])
def test_large_image_is_decoded_at_a_reduced_scale_with_the_same_result(tmp_path, suffix, size, reduced):
    box = (600, 500, 1800, 1800)
    path = write_image(tmp_path / f"big.{suffix}", *size, box, seed=1)
    image, stated = read_image(path, min_side=256)
    assert stated == size and image.shape == (3, reduced[1], reduced[0]), "reduced by 2: shorter side >= 4 x 256"
    assert load_image(path).shape == (3, size[1], size[0]), "without min_side: full scale"
    ds = AnnotatedImages(
        "x", "test", [Sample(path, 0, boxes=np.array([box], dtype=float), size=size)], ["c"], tmp_path, has_boxes=True
    )
    assert (ds[0][0] - old_path(path)).abs().max() < 0.01
    assert np.allclose(ds.sample(0)["boxes"], ds.box_list(0), atol=0.5), "boxes follow the reduced image"


def test_10000_pixel_png_is_decoded_small(tmp_path):
    path = write_grey_png(tmp_path / "huge.png", 10000, 10000, bands=(0, 128, 255))
    assert path.stat().st_size < 200_000
    image, size = read_image(path, convert=True, min_side=256)
    assert size == (10000, 10000) and image.shape == (3, 1112, 1112), "reduced by 9: shorter side >= 4 x 256"
    column = pixels(image[0, :, 0])
    assert column[0] == 0 and column[556] == 128 and column[-1] == 255


def test_image_above_the_pixel_limit_is_refused_from_its_header(tmp_path):
    path = write_grey_png(tmp_path / "bomb.png", 20000, 20000)
    for read in (load_image, read_image_size):
        with pytest.raises(
            ImageFileError,
            match=rf"bomb.png is 20000x20000 pixels \(400 megapixels\).*limit of "
            rf"{MAX_PIXELS / 1e6:.0f} megapixels",
        ):
            read(path)


def test_epviz_limit_applies_whatever_pils_own_limit(tmp_path, monkeypatch):
    path = write_image(tmp_path / "photo.png", 120, 100, None)
    monkeypatch.setattr(_Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would raise its DecompressionBombError
    assert load_image(path).shape == (3, 100, 120)
    monkeypatch.setattr("epviz.data.images.MAX_PIXELS", 5000)
    with pytest.raises(ImageFileError, match="photo.png is 120x100 pixels"):
        load_image(path)


def test_extreme_aspect_ratio_is_refused_by_the_evaluation_transform(tmp_path):
    _Image.fromarray(np.zeros((4096, 1, 3), dtype=np.uint8)).save(tmp_path / "thread.png")
    ds = AnnotatedImages(
        "x", "test", [Sample(tmp_path / "thread.png", 0, boxes=np.array([[0.0, 0, 1, 10]]))], ["c"], tmp_path, has_boxes=True
    )
    for read in (lambda: ds[0], lambda: ds.box_list(0)):
        with pytest.raises(ImageFileError, match=r"thread.png is 1x4096 pixels, an aspect ratio of 4096:1, beyond the 32:1"):
            read()
    with pytest.raises(DataError, match="1x4096"):
        EvalTransform()(torch.zeros(3, 4096, 1))
    assert EvalTransform()(torch.zeros(3, 32, 1024)).image.shape == (3, 224, 224), "32:1 is accepted"
