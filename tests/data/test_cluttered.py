import dataclasses

import pytest
import torch

from epviz.data import CanvasGenerator, CanvasRecipe, ClutteredFashionMNIST, fashion_mnist


def test_boxes_are_tight_around_masks(small_canvases):
    ds = small_canvases
    for i in range(len(ds)):
        mask = ds.masks[i]
        assert mask.any(), f"canvas {i} has an empty mask"
        x0, y0, x1, y1 = ds.boxes[i].long().tolist()
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (x0, y0, x1, y1) == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert not (mask & ~inside).any(), "mask pixels outside the box"


def test_item_sizes_and_image_format(small_canvases):
    ds = small_canvases
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (48, 3, 64, 64)
    widths = ds.boxes[:, 2] - ds.boxes[:, 0]
    heights = ds.boxes[:, 3] - ds.boxes[:, 1]
    # bilinear resampling can spill one pixel past each side of the item's square
    assert widths.max() <= 48 + 2 and heights.max() <= 48 + 2
    assert widths.min() >= 4 and heights.min() >= 4
    assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) <= 9
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1 and isinstance(label, int)


def test_background_is_never_plain(small_canvases):
    ds = small_canvases
    outside = ~ds.masks[:, None].expand(-1, 3, -1, -1)
    for i in range(len(ds)):
        bg = ds.images[i][outside[i]].float()
        assert bg.std() > 2.0, f"canvas {i} has a flat background"
        assert bg.mean() < 0.5 * 255, "background must stay in a low range"


def test_item_is_brighter_than_background(small_canvases):
    ds = small_canvases
    grey = ds.images.float().mean(1)
    item = (grey * ds.masks).sum((1, 2)) / ds.masks.sum((1, 2))
    bg = (grey * ~ds.masks).sum((1, 2)) / (~ds.masks).sum((1, 2))
    assert (item > bg).float().mean() > 0.9


def test_generation_is_deterministic_and_seeded():
    a = ClutteredFashionMNIST("train", 64, seed=7)
    b = ClutteredFashionMNIST("train", 64, seed=7)
    c = ClutteredFashionMNIST("train", 64, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_chunking_does_not_change_canvases():
    gen = CanvasGenerator("test")
    items = torch.arange(40)
    one = gen.draw(items, torch.Generator().manual_seed(1), chunk=512)
    many = gen.draw(items, torch.Generator().manual_seed(1), chunk=7)
    assert torch.equal(one.images, many.images) and torch.equal(one.masks, many.masks)


def test_fixed_sets_do_not_repeat_items():
    ds = ClutteredFashionMNIST("test", 500, seed=0)
    assert len(set(ds.items.tolist())) == 500


def test_epoch_covers_every_training_item_once():
    gen = CanvasGenerator("test")  # the 10,000-item split keeps this quick
    seen = torch.cat([b.items for b in gen.epoch(2500, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(gen.num_items))


def test_train_and_test_canvases_use_only_their_split(fake_fashion_mnist):
    # train items are solid white squares, test items entirely black: any train item
    # (main or distractor) on a test canvas would show as bright pixels and mask
    recipe = CanvasRecipe(distractor_probability=1.0, distractor_gain=(1.0, 1.0), tint_probability=0.0)
    test = ClutteredFashionMNIST("test", 20, seed=0, recipe=recipe)
    assert not test.masks.any()
    bright_limit = 255 * (recipe.background_low[1] + recipe.background_span[1]) + 1
    assert int(test.images.max()) <= bright_limit
    train = ClutteredFashionMNIST("train", 20, seed=0, recipe=recipe)
    assert train.masks.flatten(1).any(1).all()
    assert int(train.images.max()) > 200


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        ClutteredFashionMNIST("val", 10)
    with pytest.raises(ValueError, match="size"):
        ClutteredFashionMNIST("train", 0)
    with pytest.raises(ValueError, match="item_size"):
        CanvasRecipe(item_size=(40, 80))


def test_missing_files_error_lists_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "_download", lambda target: False)
    with pytest.raises(fashion_mnist.FashionMNISTNotFound) as err:
        fashion_mnist.load_fashion_mnist("train")
    text = str(err.value)
    assert str(tmp_path / "nowhere") in text and "apt-get install dataset-fashion-mnist" in text and "EPVIZ_DATA" in text


def test_truncated_file_is_reported(fake_fashion_mnist):
    import gzip

    path = fake_fashion_mnist / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path) as fh:
        data = fh.read()
    with gzip.open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.load_fashion_mnist("test")


def test_recipe_is_part_of_the_fingerprint():
    a = ClutteredFashionMNIST("test", 8, seed=0)
    b = ClutteredFashionMNIST("test", 8, seed=0, recipe=dataclasses.replace(CanvasRecipe(), item_floor=0.5))
    assert a.fingerprint() != b.fingerprint()


def test_salience_levels_make_brightness_a_weaker_cue():
    import torch.nn.functional as F

    from epviz.data import load_split

    contrast, brightest_on_item, fingerprints = [], [], set()
    for level in (0, 1, 2):
        spec = "cluttered-fashion-mnist" + (f"?salience={level}" if level else "")
        canvases = load_split(spec, "test", size=200)
        grey, masks = canvases.images.float().mean(1) / 255, canvases.masks
        contrast.append(float(grey[masks].mean() - grey[~masks].mean()))
        patches = F.avg_pool2d(grey[:, None], 8).flatten(1)
        on_item = F.avg_pool2d(masks[:, None].float(), 8).flatten(1).gather(1, patches.argmax(1, keepdim=True)) > 0.5
        brightest_on_item.append(float(on_item.float().mean()))
        fingerprints.add(canvases.fingerprint()["recipe"])
    assert contrast[0] > contrast[1] > contrast[2] > 0
    assert brightest_on_item[0] > 0.95 and brightest_on_item[2] < 0.7
    assert len(fingerprints) == 3, "the level is part of the token caches' key"
    with pytest.raises(ValueError, match="salience level"):
        load_split("cluttered-fashion-mnist?salience=3", "test", size=10)
