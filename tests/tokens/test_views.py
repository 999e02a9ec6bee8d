"""Augmented views: the seeded crop + flip, and TokenSets holding several views per image."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from epviz.errors import ConfigError, DataError
from epviz.tokens import Int8Tokens, TokenSet, ViewParams, apply_view, augmented_batch, view_params
from epviz.tokens.views import _draw_view


def test_view_params_depend_on_seed_image_and_view_only():
    assert view_params(7, 2, 11, 224, 224) == view_params(7, 2, 11, 224, 224)
    drawn = [view_params(i, v, s, 224, 224) for i in range(6) for v in range(4) for s in (0, 1, 12345)]
    assert len(set(drawn)) == len(drawn), "every (seed, image, view) gets its own crop"


def test_sampling_is_torchvision_random_resized_crop_then_flip():
    cases = [
        ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3)),
        ((60, 200), (0.08, 1.0), (3 / 4, 4 / 3)),
        ((7, 5), (0.9, 1.0), (5.0, 6.0)),
    ]
    for s in range(300):
        (height, width), scale, ratio = cases[s % len(cases)]
        with torch.random.fork_rng():
            torch.manual_seed(s)
            box = T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
            flip = bool(torch.rand(1) < 0.5)
        ours = _draw_view(torch.Generator().manual_seed(s), height, width, scale, ratio)
        assert (ours.top, ours.left, ours.h, ours.w, ours.flip) == (*box, flip)


def test_crops_lie_inside_with_area_and_aspect_in_range():
    scale, ratio = (0.2, 0.9), (0.5, 2.0)
    drawn = [view_params(i, v, 3, 96, 128, scale, ratio) for i in range(500) for v in range(2)]
    for p in drawn:
        assert p.top >= 0 and p.left >= 0 and p.top + p.h <= 96 and p.left + p.w <= 128
        assert scale[0] - 0.02 <= p.h * p.w / (96 * 128) <= scale[1] + 0.02
        assert ratio[0] * 0.9 <= p.w / p.h <= ratio[1] * 1.1
    flips = np.mean([p.flip for p in drawn])
    assert 0.45 < flips < 0.55
    assert len({(p.top, p.left) for p in drawn}) > 500, "positions vary"


def test_area_is_uniform_and_aspect_log_uniform_when_every_box_fits():
    scale, ratio = (0.1, 0.4), (0.5, 2.0)  # the largest box, 0.4 x 128^2 at aspect 2, is 114 px wide: it fits
    drawn = [view_params(i, 0, 8, 128, 128, scale, ratio) for i in range(2000)]
    areas = np.array([p.h * p.w / 128**2 for p in drawn])
    assert abs(areas.mean() - 0.25) < 0.01 and abs(areas.std() - 0.3 / math.sqrt(12)) < 0.01
    log_aspect = np.log([p.w / p.h for p in drawn])
    assert abs(log_aspect.mean()) < 0.04 and abs(log_aspect.std() - 2 * math.log(2) / math.sqrt(12)) < 0.03


def test_no_fitting_box_falls_back_to_a_central_crop():
    p = view_params(0, 0, 0, 10, 1000, scale=(0.9, 1.0), ratio=(1.0, 2.0))  # no box of 90% area and aspect <= 2 fits
    assert (p.h, p.w) == (10, 20) and (p.top, p.left) == (0, 490)
    p = view_params(0, 0, 0, 1000, 10, scale=(0.9, 1.0), ratio=(1.0, 2.0))
    assert (p.h, p.w) == (10, 10) and (p.top, p.left) == (495, 0)


def images(b=4, seed=0):
    return torch.rand(b, 3, 40, 52, generator=torch.Generator().manual_seed(seed))


def test_views_do_not_depend_on_the_batch():
    a, b = images(4, seed=0), images(4, seed=1)
    batch = augmented_batch(a, first_index=10, view=1, seed=5, size=(16, 16))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    mixed = torch.cat([b[:2], a[2:3]])  # image 12 at position 2 of a batch starting at 10, with other neighbours
    assert torch.equal(augmented_batch(mixed, 10, 1, 5, (16, 16))[2], batch[2])
    alone = augmented_batch(a[2:3], 12, 1, 5, (16, 16))  # image 12 first in its batch
    assert torch.equal(alone[0], batch[2])
    assert not torch.equal(augmented_batch(a[2:3], 12, 0, 5, (16, 16))[0], batch[2]), "another view"


def test_apply_view_crops_resizes_and_flips():
    x = images(2)
    whole = ViewParams(top=0, left=0, h=40, w=52, flip=False)
    assert torch.allclose(apply_view(x, [whole, whole], (40, 52)), x, atol=1e-6)
    flipped = apply_view(x, [whole, ViewParams(0, 0, 40, 52, True)], (40, 52))
    assert torch.allclose(flipped[1], x[1].flip(-1), atol=1e-6)
    box = ViewParams(top=5, left=7, h=20, w=30, flip=False)
    assert torch.allclose(apply_view(x[:1], [box], (20, 30))[0], x[0, :, 5:25, 7:37], atol=1e-6)
    assert apply_view(x, [box, box], (8, 12)).shape == (2, 3, 8, 12)
    as_bytes = (x * 255).round().to(torch.uint8)
    assert torch.allclose(apply_view(as_bytes, [whole, whole], (40, 52)), as_bytes.float() / 255, atol=1e-6)


def test_view_arguments_are_checked():
    x = images(2)
    with pytest.raises(ConfigError, match="1 view params for 2 images"):
        apply_view(x, [ViewParams(0, 0, 4, 4, False)], (8, 8))
    with pytest.raises(DataError, match="does not lie inside the 40x52 image"):
        apply_view(x[:1], [ViewParams(30, 0, 20, 4, False)], (8, 8))
    with pytest.raises(DataError, match=r"images must be a tensor \(B, C, H, W\)"):
        apply_view(x[0], [], (8, 8))
    with pytest.raises(ConfigError, match="size must be"):
        apply_view(x, [ViewParams(0, 0, 4, 4, False)] * 2, 8)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        view_params(0, 0, -1, 10, 10)
    with pytest.raises(ConfigError, match="scale must be"):
        view_params(0, 0, 0, 10, 10, scale=(0.9, 0.1))
    with pytest.raises(ConfigError, match="ratio must be"):
        view_params(0, 0, 0, 10, 10, ratio=(0.0, 1.0))


N_IMAGES, K = 6, 3


def viewed(views=K, n=N_IMAGES, prefix=True, int8=False):
    """A TokenSet whose every token of row i * K + v holds 10 * i + v."""
    codes = (10 * np.arange(n)[:, None] + np.arange(views)).reshape(-1).astype(np.float32)
    patch = np.repeat(codes[:, None, None], 4, axis=1).repeat(2, axis=2)
    pre = patch[:, :1] + 0.5 if prefix else None
    if int8:
        patch, pre = Int8Tokens.from_floats(patch), None if pre is None else Int8Tokens.from_floats(pre)
    return TokenSet(patch, pre, np.arange(n) % 2, (2, 2), views=views)


def codes(batch):
    return batch.patch[:, 0, 0].round().int().tolist()


def test_batches_read_view_zero_until_an_epoch_is_chosen():
    ts = viewed()
    assert len(ts) == N_IMAGES and ts.views == K and ts.patch.shape[0] == N_IMAGES * K
    b = ts.batch(np.array([4, 1, 5]))
    assert codes(b) == [40, 10, 50] and b.labels.tolist() == [0, 1, 1] and b.index.tolist() == [4, 1, 5]
    assert b.prefix[:, 0, 0].tolist() == [40.5, 10.5, 50.5]
    assert sum(len(b.index) for b in ts.batches(4)) == N_IMAGES


def test_for_epoch_draws_one_view_per_image():
    ts = viewed()
    e0, e0_again, e1 = ts.for_epoch(0, seed=3), ts.for_epoch(0, seed=3), ts.for_epoch(1, seed=3)
    assert np.array_equal(e0.view_choice, np.random.default_rng((3, 0)).integers(0, K, size=N_IMAGES))
    assert np.array_equal(e0.view_choice, e0_again.view_choice), "reproducible for the same (seed, epoch)"
    assert not np.array_equal(e0.view_choice, e1.view_choice), "epochs differ"
    assert not np.array_equal(e0.view_choice, ts.for_epoch(0, seed=4).view_choice), "seeds differ"
    index = np.array([5, 0, 2, 2])
    assert codes(e1.batch(index)) == [10 * i + e1.view_choice[i] for i in index]
    assert ts.view_choice.tolist() == [0] * N_IMAGES, "the original set is untouched"
    seen = np.stack([ts.for_epoch(e, seed=3).view_choice for e in range(40)])
    assert all(set(seen[:, i]) == set(range(K)) for i in range(N_IMAGES)), "every view is used over epochs"
    single = viewed(views=1)
    assert single.for_epoch(5, seed=1) is single
    with pytest.raises(ConfigError, match="epoch must be a non-negative integer"):
        ts.for_epoch(-1, seed=0)


def test_subset_and_load_keep_the_views():
    ts = viewed().for_epoch(2, seed=0)
    sub = ts.subset([4, 1])
    assert len(sub) == 2 and sub.views == K and sub.patch.shape[0] == 2 * K and sub.prefix.shape[0] == 2 * K
    assert sub.patch[:, 0, 0].tolist() == [10, 11, 12, 40, 41, 42]
    assert codes(sub.batch(np.array([1, 0]))) == codes(ts.batch(np.array([4, 1]))), "the chosen views come along"
    assert codes(sub.for_epoch(0, 0).batch(np.array([0]))) in ([10], [11], [12])
    loaded = ts.load()
    assert loaded.views == K and np.array_equal(loaded.view_choice, ts.view_choice)
    assert codes(loaded.batch(np.arange(N_IMAGES))) == codes(ts.batch(np.arange(N_IMAGES)))


def test_int8_tokens_with_views():
    ts = viewed(int8=True).for_epoch(1, seed=9)
    assert isinstance(ts.subset([0, 3]).patch, Int8Tokens) and isinstance(ts.load().patch, Int8Tokens)
    assert codes(ts.batch(np.arange(N_IMAGES))) == codes(viewed().for_epoch(1, seed=9).batch(np.arange(N_IMAGES)))


def test_find_nonfinite_counts_images_not_views():
    ts = viewed()
    ts.patch[3 * K + 2, 0, 0] = np.nan
    ts.patch[3 * K + 1, 0, 0] = np.nan
    ts.prefix[5 * K, 0, 0] = np.inf
    found = ts.find_nonfinite(chunk_bytes=1)
    assert (found.first, found.part, found.count, found.total) == (3, "patch", 2, N_IMAGES)


def test_row_counts_must_fit_images_times_views():
    ts = viewed()
    with pytest.raises(DataError, match=r"patch tokens hold 17 rows but 6 images with views=3 need 18 \(image-major"):
        TokenSet(ts.patch[:17], None, ts.labels, (2, 2), views=K)
    with pytest.raises(DataError, match="patch tokens hold 18 rows but 5 images with views=3 need 15"):
        TokenSet(ts.patch, None, ts.labels[:5], (2, 2), views=K)
    with pytest.raises(DataError, match="prefix tokens cover 12 rows, patch tokens 18"):
        TokenSet(ts.patch, ts.prefix[:12], ts.labels, (2, 2), views=K)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="views must be a positive integer"):
            TokenSet(ts.patch, None, ts.labels, (2, 2), views=bad)
