"""Every built-in dataset satisfies the declared ImageDataset protocol, and the stages read it through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epviz.analysis.boxes import box_source
from epviz.data import (
    AnnotatedImages,
    Fingerprinted,
    GroundTruthBoxes,
    ImageBatches,
    ImageDataset,
    ImageFolderDataset,
    imagenet,
    load_split,
    to_display,
)
from tests.data.formats import write_image, write_imagenet


def test_canvases_satisfy_the_protocol_and_the_batch_fast_path(small_canvases):
    ds = small_canvases
    assert isinstance(ds, ImageDataset) and isinstance(ds, ImageBatches) and isinstance(ds, Fingerprinted)
    assert ds.has_boxes and ds.image_size == 64 and ds.num_classes == len(ds.classes) == 10
    shown = ds.display_image(3)
    assert shown.dtype == np.uint8 and shown.shape == (64, 64, 3)
    assert np.array_equal(shown, ds.images[3].permute(1, 2, 0).numpy())
    assert np.array_equal(shown, to_display(ds[3][0]))
    assert np.array_equal(ds.box_list(3), ds.boxes[3:4].numpy())


def test_annotated_images_satisfy_the_protocol(tmp_path):
    truth = write_imagenet(tmp_path)
    ds = imagenet(tmp_path, "val")
    assert isinstance(ds, ImageDataset) and not isinstance(ds, ImageBatches)
    assert ds.has_boxes and ds.image_size == 224
    shown = ds.display_image(0)
    assert shown.dtype == np.uint8 and shown.shape == (224, 224, 3)
    x0, y0, x1, y1 = ds.box_list(0)[0]
    assert shown[int(y0) + 3 : int(y1) - 3, int(x0) + 3 : int(x1) - 3].mean() > 200, "the box frames the bright rectangle"
    assert len(truth) == len(ds)


def test_image_folders_satisfy_the_protocol_without_boxes(tmp_path):
    for i in range(3):
        write_image(tmp_path / "cat" / f"{i}.png", 40, 30, None, seed=i)
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert isinstance(ds, ImageDataset) and not ds.has_boxes
    assert ds.display_image(1).shape == (16, 16, 3) and ds.display_image(1).dtype == np.uint8
    with pytest.raises(ValueError, match="no box annotations"):
        ds.box_list(0)
    spec = load_split(f"imagefolder:{tmp_path}", "test")
    assert isinstance(spec, AnnotatedImages) and isinstance(spec, ImageDataset) and not spec.has_boxes


def test_to_display_accepts_float_and_uint8_images():
    image = torch.tensor([0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 4).expand(3, 1, 4)
    assert to_display(image).tolist() == [[[0] * 3, [128] * 3, [255] * 3, [255] * 3]]
    assert to_display(np.full((3, 2, 2), 7, np.uint8)).shape == (2, 2, 3)


def test_localization_reads_boxes_through_the_protocol(tmp_path, small_canvases):
    assert np.array_equal(box_source(small_canvases)(2), small_canvases.box_list(2))
    for i in range(2):
        write_image(tmp_path / "cat" / f"{i}.png", 40, 30, None, seed=i)
    with pytest.raises(ValueError, match="has no box annotations"):
        box_source(ImageFolderDataset(tmp_path))
    boxes = np.array([[0, 0, 4, 4], [1, 1, 3, 3]], dtype=float)

    class Stand:
        image_size = 8

        def __init__(self):
            self.boxes = boxes

        def __len__(self):
            return 2

    assert isinstance(Stand(), GroundTruthBoxes)
    assert np.array_equal(box_source(Stand())(1), boxes[1]) and np.array_equal(box_source(boxes)(0), boxes[0])
    assert np.array_equal(box_source([boxes[:1], boxes])(1), boxes)
