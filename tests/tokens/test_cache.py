import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from epviz.backbones import load_backbone
from epviz.data import ClutteredFashionMNIST
from epviz.errors import DataError
from epviz.tokens import TokenCache, extract_tokens


def direct_tokens(bb, ds, layers, norm=False):
    x = ds.image_batch(slice(None))
    x = torch.nn.functional.interpolate(x, size=bb.image_size, mode="bicubic", antialias=True, align_corners=False)
    x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return bb.model.forward_intermediates(
            x, indices=layers, norm=norm, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )


def test_tokens_match_the_backbone_block_by_block(tmp_path, test_vit_backbone, small_canvases):
    cache = extract_tokens(
        test_vit_backbone, small_canvases, [0, 3, -1], cache_dir=tmp_path, dtype="float32", batch_size=20, progress=False
    )
    assert cache.layers == [0, 3, 5] and len(cache) == 48
    ref = direct_tokens(test_vit_backbone, small_canvases, [0, 3, 5])
    for layer, (patch, prefix) in zip([0, 3, 5], ref):
        np.testing.assert_allclose(cache.patch(layer), patch.numpy(), atol=1e-4)
        np.testing.assert_allclose(cache.prefix(layer), prefix.numpy(), atol=1e-4)
    assert not np.allclose(cache.patch(0), cache.patch(5)), "layer 0 must be block 0, not the last block"
    np.testing.assert_array_equal(cache.labels, small_canvases.labels.numpy())


def test_fp16_storage_and_token_set(tmp_path, test_vit_backbone, small_canvases):
    cache = extract_tokens(test_vit_backbone, small_canvases, [5], cache_dir=tmp_path, progress=False)
    assert cache.patch(5).dtype == np.float16 and isinstance(cache.patch(5), np.memmap)
    ts = cache.tokens(-1)
    assert (ts.num_tokens, ts.dim, ts.num_prefix, ts.grid, ts.num_classes) == (100, 64, 1, (10, 10), 10)
    batch = next(ts.batches(16))
    assert batch.patch.dtype == torch.float32 and batch.patch.shape == (16, 100, 64)
    with pytest.raises(KeyError, match="not in this cache"):
        cache.patch(2)


def test_final_norm_only_when_asked(tmp_path, test_vit_backbone, small_canvases):
    raw = extract_tokens(test_vit_backbone, small_canvases, [5], cache_dir=tmp_path, dtype="float32", progress=False)
    normed = extract_tokens(
        test_vit_backbone, small_canvases, [5], norm=True, cache_dir=tmp_path, dtype="float32", progress=False
    )
    assert raw.path != normed.path
    with torch.no_grad():
        expected = test_vit_backbone.model.norm(torch.from_numpy(np.array(raw.patch(5))))
    np.testing.assert_allclose(normed.patch(5), expected.numpy(), atol=1e-4)


def test_second_call_is_a_hit_that_never_runs_the_backbone(tmp_path, test_vit_backbone, small_canvases, monkeypatch):
    first = extract_tokens(test_vit_backbone, small_canvases, [1, 5], cache_dir=tmp_path, progress=False)
    assert not first.hit

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran on a cache hit")

    monkeypatch.setattr(test_vit_backbone.model, "forward_intermediates", forbidden)
    second = extract_tokens(test_vit_backbone, small_canvases, [1, 5], cache_dir=tmp_path, progress=False)
    assert second.hit and second.path == first.path


def test_every_key_component_invalidates(tmp_path, small_canvases):
    bb = load_backbone("test_vit", pretrained=False)
    base = dict(layers=[5], cache_dir=tmp_path, progress=False)
    paths = {extract_tokens(bb, small_canvases, **base).path}

    def new_path(backbone=bb, dataset=small_canvases, **changes):
        cache = extract_tokens(backbone, dataset, **{**base, **changes})
        assert not cache.hit, f"{changes or 'changed input'} was served from an old cache"
        assert cache.path not in paths
        paths.add(cache.path)

    new_path(layers=[4])
    new_path(layers=[4, 5])
    new_path(norm=True)
    new_path(precision="bf16")
    new_path(dtype="float32")
    new_path(dataset=ClutteredFashionMNIST("test", 48, seed=4))
    new_path(dataset=ClutteredFashionMNIST("test", 40, seed=3))
    other_weights = dataclasses.replace(bb, weights_id="other")
    new_path(backbone=other_weights)
    renamed = dataclasses.replace(bb, name="test_vit_renamed")
    new_path(backbone=renamed)
    new_path(backbone=dataclasses.replace(bb, mean=(0.4, 0.4, 0.4)))
    new_path(backbone=dataclasses.replace(bb, std=(0.3, 0.3, 0.3)))


INTERRUPTED = textwrap.dedent(
    """
    import sys, time
    from epviz.backbones import load_backbone
    from epviz.data import ClutteredFashionMNIST
    from epviz.tokens import extract_tokens

    class Slow(ClutteredFashionMNIST):
        def image_batch(self, index):
            print("batch", flush=True)
            time.sleep(0.3)
            return super().image_batch(index)

    bb = load_backbone("test_vit", pretrained=False)
    ds = Slow("test", 200, seed=5)
    extract_tokens(bb, ds, [2, 5], cache_dir=sys.argv[1], batch_size=8, progress=False)
    print("finished", flush=True)
    """
)


def test_interrupted_extraction_never_reads_as_complete(tmp_path, test_vit_backbone):
    script = tmp_path / "extract.py"
    script.write_text(INTERRUPTED)
    cache_dir = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script), str(cache_dir)], stdout=subprocess.PIPE, text=True, env=env)
    batches = 0
    for line in proc.stdout:
        batches += line.startswith("batch")
        if batches == 4:  # mid-write: some blocks are on disk, most are not
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(cache_dir.iterdir())
    assert leftovers and all(".partial-" in p.name for p in leftovers), "a killed run must leave only a partial folder"
    for p in leftovers:
        with pytest.raises(DataError, match="not a complete token cache"):
            TokenCache.open(p)

    class Same(ClutteredFashionMNIST):
        pass

    ds = Same("test", 200, seed=5)
    cache = extract_tokens(test_vit_backbone, ds, [2, 5], cache_dir=cache_dir, batch_size=64, dtype="float16", progress=False)
    assert not cache.hit
    assert [p.name for p in cache_dir.iterdir()] == [cache.path.name], "the stale partial folder is cleaned up"
    ref = direct_tokens(test_vit_backbone, ds, [5])[0][0].numpy()
    np.testing.assert_allclose(cache.patch(5).astype(np.float32), ref, atol=2e-2, rtol=1e-2)


class Grey(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(1, 32, 32), 0

    def fingerprint(self):
        return {"dataset": "grey"}


def test_bad_inputs_leave_nothing_behind(tmp_path, test_vit_backbone, small_canvases):
    with pytest.raises(ValueError, match="grayscale"):
        extract_tokens(test_vit_backbone, Grey(), [5], cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="out of range"):
        extract_tokens(test_vit_backbone, small_canvases, [6], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        extract_tokens(
            test_vit_backbone,
            torch.utils.data.Subset(small_canvases, []),
            [5],
            cache_dir=tmp_path,
            dataset_key={"d": 1},
            progress=False,
        )
    with pytest.raises(TypeError, match="fingerprint"):
        extract_tokens(
            test_vit_backbone, torch.utils.data.Subset(small_canvases, [0, 1]), [5], cache_dir=tmp_path, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_file_stops_extraction_cleanly(tmp_path, test_vit_backbone):
    from PIL import Image

    from epviz.data.images import ImageFileError, ImageFolderDataset

    root = tmp_path / "images" / "cat"
    root.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((24, 24, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
    good = (root / "4.png").read_bytes()
    (root / "4.png").write_bytes(good[: len(good) // 2])
    cache_dir = tmp_path / "cache"
    ds = ImageFolderDataset(tmp_path / "images", image_size=32)
    with pytest.raises(ImageFileError, match="4.png"):
        extract_tokens(test_vit_backbone, ds, [0], cache_dir=cache_dir, batch_size=2, progress=False)
    assert list(cache_dir.iterdir()) == [], "nothing half-written"


@pytest.mark.parametrize(
    "option, value",
    [
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("num_workers", -1),
        ("precision", "fp16"),
        ("dtype", "int4"),
        ("views", 0),
        ("layers", [9]),
        ("layers", []),
    ],
)
def test_extract_arguments_out_of_range(tmp_path, test_vit_backbone, small_canvases, option, value):
    from epviz.errors import ConfigError

    with pytest.raises(ConfigError, match=option):
        extract_tokens(test_vit_backbone, small_canvases, **{"layers": [5], option: value}, cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_nan_tokens_are_not_blamed_on_float16(tmp_path, small_canvases):
    from epviz.errors import DataError

    bb = load_backbone("test_vit", pretrained=False, device="cpu")
    with torch.no_grad():
        bb.model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    for dtype in ("float16", "float32"):
        with pytest.raises(DataError, match="float32' would store the same NaNs") as err:
            extract_tokens(bb, small_canvases, [3], dtype=dtype, cache_dir=tmp_path, progress=False)
        assert "image 0 first" in str(err.value)


def test_norm_defaults_to_the_backbone_convention(tmp_path, test_vit_backbone, small_canvases):
    from epviz.backbones import presets

    base = dict(cache_dir=tmp_path, dtype="float32", progress=False)
    raw = extract_tokens(test_vit_backbone, small_canvases, [5], **base)  # a plain timm name: no final norm
    assert raw.meta["norm"] is False
    assert extract_tokens(test_vit_backbone, small_canvases, [5], norm=False, **base).hit  # the same key as before
    for family, preset in (("dinov2", "dinov2-vit-s"), ("clip", "clip-vit-b"), ("mae", "mae-vit-b"), ("dino", "dino-vit-s")):
        card = {**test_vit_backbone.card, **presets.resolve(preset, None, False, {})[3]}
        bb = dataclasses.replace(test_vit_backbone, card=card)  # the tiny test_vit, carrying the preset's convention
        default = extract_tokens(bb, small_canvases, [5], **base)
        assert default.meta["norm"] is presets.PRESETS[preset].final_norm, family
        forced = extract_tokens(bb, small_canvases, [5], norm=not default.meta["norm"], **base)
        assert forced.meta["norm"] is not default.meta["norm"] and forced.path != default.path
    normed = extract_tokens(dataclasses.replace(test_vit_backbone, card={"final_norm": True}), small_canvases, [5], **base)
    with torch.no_grad():
        expected = test_vit_backbone.model.norm(torch.from_numpy(np.array(raw.patch(5))))
    np.testing.assert_allclose(normed.patch(5), expected.numpy(), atol=1e-4)


def test_the_zoo_default_key_is_unchanged(tmp_path, small_canvases):
    from epviz.tokens.cache import cache_key

    bb = load_backbone("tiny-random", device="cpu")
    cache = extract_tokens(bb, small_canvases, [-1], cache_dir=tmp_path, progress=False)
    transform = {
        "resize_to": list(bb.image_size),
        "interpolation": "bicubic-antialias",
        "mean": list(bb.mean),
        "std": list(bb.std),
    }
    key, parts = cache_key(bb, small_canvases.fingerprint(), cache.layers, False, "fp32", "float16", transform)
    assert cache.meta["key"] == key and parts["norm"] is False
    assert key == "6a2dc06e049e1bcfc586cd2e1dfe179d4ba2491162185096e8429c9f645aa345"  # the key this cache always had


def test_int8_store_dequantizes_within_the_bound_and_halves_the_disk(tmp_path, test_vit_backbone, small_canvases):
    exact = extract_tokens(test_vit_backbone, small_canvases, [2, 5], cache_dir=tmp_path, dtype="float32", progress=False)
    packed = extract_tokens(test_vit_backbone, small_canvases, [2, 5], cache_dir=tmp_path, dtype="int8", progress=False)
    half = extract_tokens(test_vit_backbone, small_canvases, [2, 5], cache_dir=tmp_path, dtype="float16", progress=False)
    assert len({exact.path, packed.path, half.path}) == 3, "the storage dtype is part of the key"
    for layer in (2, 5):
        ref = np.asarray(exact.patch(layer))
        got = np.asarray(packed.patch(layer))
        scale = np.abs(ref).max(-1, keepdims=True) / 127
        assert (np.abs(got - ref) <= scale * (0.5 + 2**-10) + 1e-7).all(), "within half a step of the token's scale"
        tokens = packed.tokens(layer)
        batch = tokens.batch(np.array([3, 0, 7]))
        torch.testing.assert_close(batch.patch, torch.from_numpy(got[[3, 0, 7]]))
        assert tokens.load().patch.nbytes < tokens.load().patch.shape[0] * 100 * 64 * 2, "int8 in memory too"
    size = {c.meta["dtype"]: sum(p.stat().st_size for p in c.path.glob("L*.npy")) for c in (exact, packed, half)}
    # int8 stores D bytes and one float32 scale per token: (D + 4) / 2D of float16 (0.53 at D = 64, 0.503 at D = 768)
    assert size["int8"] < (64 + 4) / 128 * size["float16"] + 2000 and size["float16"] < 0.51 * size["float32"]


def test_stored_views_are_the_backbone_on_the_seeded_crops(tmp_path, test_vit_backbone, small_canvases):
    from epviz.tokens.views import augmented_batch

    kwargs = dict(cache_dir=tmp_path, dtype="float32", batch_size=16, progress=False)
    plain = extract_tokens(test_vit_backbone, small_canvases, [5], **kwargs)
    viewed = extract_tokens(test_vit_backbone, small_canvases, [5], views=3, view_seed=7, **kwargs)
    other_seed = extract_tokens(test_vit_backbone, small_canvases, [5], views=3, view_seed=8, **kwargs)
    assert len({plain.path, viewed.path, other_seed.path}) == 3, "views and their seed are part of the key"
    assert viewed.views == 3 and len(viewed) == 48 and viewed.patch(5).shape[0] == 48 * 3
    tokens = viewed.tokens(5)
    assert len(tokens) == 48 and tokens.views == 3
    images = small_canvases.image_batch(slice(10, 14))
    crops = augmented_batch(images, 10, 2, 7, test_vit_backbone.image_size)  # view 2 of images 10-13
    x = (crops - torch.tensor(test_vit_backbone.mean).view(1, 3, 1, 1)) / torch.tensor(test_vit_backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ((ref, _),) = test_vit_backbone.model.forward_intermediates(
            x, indices=[5], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    np.testing.assert_allclose(
        np.asarray(viewed.patch(5))[[10 * 3 + 2, 11 * 3 + 2, 12 * 3 + 2, 13 * 3 + 2]], ref.numpy(), atol=1e-4
    )
    assert not np.allclose(np.asarray(viewed.patch(5))[0::3], np.asarray(plain.patch(5)), atol=1e-2), "views are crops"
    epoch = tokens.for_epoch(3, seed=0)
    assert set(np.unique(epoch.view_choice)) <= {0, 1, 2}
