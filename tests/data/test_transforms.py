import numpy as np
import pytest
import torch

from epviz.data.transforms import EvalTransform, train_transform


def test_resize_256_center_crop_224_moves_a_known_box_as_computed_by_hand():
    # 400x300 (w x h): shorter side 300 -> 256, so the width becomes int(256 * 400 / 300) = 341.
    # scale x = 341/400, y = 256/300; crop offsets left = round((341 - 224) / 2) = 58, top = (256 - 224) / 2 = 16.
    t = EvalTransform()
    boxes, visible = t.boxes(np.array([[100, 60, 300, 240]]), (300, 400))
    sx, sy = 341 / 400, 256 / 300
    expected = [100 * sx - 58, 60 * sy - 16, 300 * sx - 58, 240 * sy - 16]
    assert np.allclose(boxes[0], expected, atol=1e-3) and np.allclose(expected, [27.25, 35.2, 197.75, 188.8], atol=1e-3)
    assert visible.tolist() == [True]


def test_image_and_box_stay_aligned_under_bicubic_resize_and_crop():
    image = torch.zeros(3, 300, 400)
    image[:, 60:240, 100:300] = 1.0
    out = EvalTransform()(image, np.array([[100, 60, 300, 240]]))
    assert out.image.shape == (3, 224, 224) and out.image.min() >= 0 and out.image.max() <= 1
    bright = out.image[0] > 0.5
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    x0, y0, x1, y1 = out.boxes[0]
    assert abs(cols[0] - x0) <= 1 and abs(cols[-1] + 1 - x1) <= 1
    assert abs(rows[0] - y0) <= 1 and abs(rows[-1] + 1 - y1) <= 1


def test_boxes_are_clipped_to_the_crop_and_a_box_cropped_away_is_reported():
    boxes, visible = EvalTransform().boxes(np.array([[0, 0, 20, 20], [50, 0, 350, 300], [390, 10, 400, 290]]), (300, 400))
    assert visible.tolist() == [False, True, False], "boxes in the cropped-off margins are flagged, not dropped"
    assert len(boxes) == 3
    assert boxes[1].tolist() == pytest.approx([0, 0, 224, 224])


def test_mask_is_resampled_with_the_image_and_stays_binary():
    image = torch.zeros(3, 100, 100)
    mask = np.zeros((100, 100), bool)
    mask[20:80, 30:60] = True
    out = EvalTransform(resize=50, crop=50)(image, None, mask)
    assert out.mask.dtype == torch.bool and out.mask.shape == (50, 50)
    assert out.mask[10:40, 15:30].all() and not out.mask[:, :14].any()
    with pytest.raises(ValueError, match="same size"):
        EvalTransform()(image, None, np.zeros((10, 10), bool))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must not exceed"):
        EvalTransform(resize=200, crop=224)
    with pytest.raises(ValueError, match="positive"):
        EvalTransform(crop=0)
    with pytest.raises(ValueError, match="scale"):
        train_transform(scale=(0.5, 0.1))


def test_train_transform_draws_random_crops_of_the_requested_size():
    torch.manual_seed(0)
    image = torch.rand(3, 90, 120)
    t = train_transform(64)
    a, b = t(image), t(image)
    assert a.shape == b.shape == (3, 64, 64) and not torch.equal(a, b)
