import numpy as np
import pytest
import torch

from epviz import Setting
from epviz.data import load_split, standard_splits
from epviz.data.annotated import AnnotationError
from epviz.data.imagenet import imagenet, read_solution_csv
from epviz.data.images import ImageFileError
from epviz.data.transforms import EvalTransform
from tests.data.formats import WNIDS, write_image, write_imagenet


def expected_boxes(box, width, height, t=None):
    t = EvalTransform() if t is None else t
    return t.boxes(np.array([box]), (height, width))[0]


@pytest.mark.parametrize(
    "layout,boxes", [("folders", "xml"), ("flat", "xml"), ("flat", "csv"), ("flat", "beside"), ("folders", "csv")]
)
def test_val_labels_follow_sorted_wnids_and_boxes_follow_the_transform(tmp_path, layout, boxes):
    truth = write_imagenet(tmp_path, layout=layout, boxes=boxes)
    ds = imagenet(tmp_path, "val")
    assert ds.classes == sorted(WNIDS) and len(ds) == len(truth)
    assert ds.standard_split == "test", "the official val images are the probes' test set; the dataset says so itself"
    for i, sample in enumerate(ds.samples):
        wnid, box, (w, h) = truth[sample.path.stem]
        assert ds.labels[i] == sorted(WNIDS).index(wnid)
        assert np.allclose(ds.box_list(i), expected_boxes(box, w, h), atol=1e-4)
    image, label = ds[0]
    assert image.shape == (3, 224, 224) and label == ds.labels[0]
    # the box sits on the bright rectangle of the transformed image
    x0, y0, x1, y1 = ds.box_list(0)[0]
    bright = image[0] > 0.6
    assert bright[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2].float().mean() > 0.95
    assert bright.float().mean() < 0.6


def test_class_index_order_is_torchvisions_sorted_wnids(tmp_path):
    write_imagenet(tmp_path)
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(f"{w} fish {i}" for i, w in enumerate(reversed(WNIDS))) + "\n")
    train = imagenet(tmp_path, "train")
    assert train.classes == sorted(WNIDS)
    assert [train.classes[label] for label in train.labels] == [s.path.parent.name for s in train.samples]
    assert not train.has_boxes
    with pytest.raises(AnnotationError, match="no box annotations"):
        train.box_list(0)


def test_solution_csv_boxes_are_inclusive_pixel_indices(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 10 20 29 39 n01751748 0 0 4 4 \n")
    boxes, wnids = read_solution_csv(path)["ILSVRC2012_val_00000001"]
    assert boxes.tolist() == [[10, 20, 30, 40], [0, 0, 5, 5]] and wnids == ["n01751748", "n01751748"]
    path.write_text("id,boxes\n")
    with pytest.raises(AnnotationError, match="ImageId,PredictionString"):
        read_solution_csv(path)


def test_missing_annotation_file_names_the_file(tmp_path):
    truth = write_imagenet(tmp_path, layout="flat", boxes="xml")
    stem = sorted(truth)[1]
    (tmp_path / "Annotations" / "CLS-LOC" / "val" / f"{stem}.xml").unlink()
    with pytest.raises(AnnotationError, match=f"{stem}.xml.*missing"):
        imagenet(tmp_path, "val")


def test_flat_val_without_any_boxes_asks_for_them(tmp_path):
    write_imagenet(tmp_path, layout="flat", boxes="none")
    with pytest.raises(AnnotationError, match="boxes="):
        imagenet(tmp_path, "val")


def test_box_outside_its_image_is_an_error(tmp_path):
    truth = write_imagenet(tmp_path, layout="folders", boxes="csv")
    csv = tmp_path / "LOC_val_solution.csv"
    stem = sorted(truth)[0]
    wnid, _, (w, h) = truth[stem]
    lines = csv.read_text().splitlines()
    lines = [f"{stem},{wnid} 10 10 {w + 30} {h - 5} " if line.startswith(stem) else line for line in lines]
    csv.write_text("\n".join(lines) + "\n")
    ds = imagenet(tmp_path, "val")
    index = [s.path.stem for s in ds.samples].index(stem)
    with pytest.raises(AnnotationError, match="outside"):
        ds.box_list(index)


def test_image_that_does_not_decode_names_the_file(tmp_path):
    truth = write_imagenet(tmp_path)
    ds = imagenet(tmp_path, "val")
    ds.samples[0].path.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageFileError, match=f"{ds.samples[0].path.name}.*corrupt"):
        ds[0]
    assert len(truth) == len(ds)


def test_empty_class_folder_is_an_error(tmp_path):
    write_imagenet(tmp_path)
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999 holds no images"):
        imagenet(tmp_path, "train")


def test_box_cropped_away_is_reported_not_dropped(tmp_path):
    write_imagenet(tmp_path, train_per_class=1, val_per_class=1, boxes="beside")
    folder = tmp_path / "val" / WNIDS[0]
    image = next(folder.glob("*.JPEG"))
    write_image(image, 200, 50, (0, 5, 12, 45))  # a wide image: the left edge falls outside the center crop
    xml = image.with_suffix(".xml")
    xml.write_text(
        xml.read_text()
        .replace("<width>80</width><height>60</height>", "<width>200</width><height>50</height>")
        .replace(
            "</object>",
            "</object><object><name>x</name><bndbox><xmin>80</xmin><ymin>5</ymin>"
            "<xmax>119</xmax><ymax>44</ymax></bndbox></object>",
            1,
        )
        .replace(
            xml.read_text().split("<bndbox>")[1].split("</bndbox>")[0],
            "<xmin>0</xmin><ymin>5</ymin><xmax>11</xmax><ymax>44</ymax>",
        )
    )
    ds = imagenet(tmp_path, "val")
    index = [s.path for s in ds.samples].index(image)
    with pytest.warns(UserWarning, match="cropped_away"):
        kept = ds.box_list(index)
    assert len(kept) == 1
    report = ds.cropped_away([index])
    assert len(report) == 1 and report["box"][0] == [0.0, 5.0, 12.0, 45.0] and report["boxes_left"][0] == 1


def test_dataset_spec_forms_train_val_test(tmp_path):
    write_imagenet(tmp_path, train_per_class=10, val_per_class=2)
    spec = f"imagenet:{tmp_path}"
    train, val, test = (load_split(spec, s) for s in ("train", "val", "test"))
    assert len(test) == 6 and test.has_boxes and test.split == "val"
    assert len(val) == 3 and len(train) == 27, "10% of each class of train is held out as val"
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    small = load_split(spec, "train", size=6, seed=1)
    assert np.bincount(small.labels).tolist() == [2, 2, 2], "subsets are balanced over classes"
    assert small.fingerprint() != load_split(spec, "train", size=6, seed=2).fingerprint()
    sets = standard_splits(spec, Setting.fast().sizes)
    assert {k: len(v) for k, v in sets.items()} == {"train": 27, "val": 3, "test": 6}
    assert torch.is_tensor(sets["test"][0][0])


def test_dataset_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset.*imagenet:<root>"):
        load_split("imagenet-val", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(f"imagenet:{tmp_path / 'nowhere'}", "test")
    write_imagenet(tmp_path)
    with pytest.raises(ValueError, match="unknown option 'zoom'"):
        load_split(f"imagenet:{tmp_path}?zoom=2", "test")
    with pytest.raises(ValueError, match="split"):
        load_split(f"imagenet:{tmp_path}", "validation")
    ds = load_split(f"imagenet:{tmp_path}?resize=120&crop=96", "test")
    assert ds[0][0].shape == (3, 96, 96) and ds.image_size == 96


# --- strict LOC_val_solution.csv -----------------------------------------------------------------


def solution_rows(tmp_path, layout="flat"):
    truth = write_imagenet(tmp_path, layout=layout, boxes="csv")
    return truth, tmp_path / "LOC_val_solution.csv", (tmp_path / "LOC_val_solution.csv").read_text().splitlines()


def test_repeated_image_id_names_the_id_and_both_lines(tmp_path):
    truth, path, lines = solution_rows(tmp_path)
    stem = sorted(truth)[1]
    wnid = truth[stem][0]
    path.write_text("\n".join(lines + [f"{stem},{wnid} 1 1 9 9 "]) + "\n")
    with pytest.raises(AnnotationError, match=rf"ImageId {stem} appears on line 3 and again on line {len(lines) + 1}"):
        imagenet(tmp_path, "val")


def test_unbalanced_quote_cannot_hand_one_image_the_boxes_of_the_next_rows(tmp_path):
    truth, path, lines = solution_rows(tmp_path)
    lines[2] = lines[2].replace(",", ',"', 1)  # an opening quote that is never closed
    path.write_text("\n".join(lines) + "\n")
    for stem in sorted(truth)[2:]:  # a val folder holding only some of the images
        (tmp_path / "val" / f"{stem}.JPEG").unlink()
    with pytest.raises(AnnotationError, match=r"LOC_val_solution.csv, line 3 holds a quote character"):
        imagenet(tmp_path, "val")


def test_prediction_string_must_be_whole_groups_each_with_a_wnid(tmp_path):
    truth, path, lines = solution_rows(tmp_path)
    stem = sorted(truth)[0]
    wnid = truth[stem][0]
    for bad, reason in (
        (f"{wnid} 1 2 30 40 50 60 70 80 90", r"line 2: group 2 of the PredictionString starts with '50', not a wnid"),
        (f"{wnid} 1 2 30 40 {wnid} 5 6", r"line 2: .*its 8 values are not a multiple of 5"),
        (f"{wnid} 1 2 x 40", r"line 2: group 1 \(.* 1 2 x 40\) has non-numeric"),
    ):
        path.write_text("\n".join([lines[0], f"{stem},{bad}"] + lines[2:]) + "\n")
        with pytest.raises(AnnotationError, match=reason):
            read_solution_csv(path)


def test_extra_column_is_an_error_not_dropped(tmp_path):
    truth, path, lines = solution_rows(tmp_path)
    lines[4] += ",0.93"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"line 5 has 3 fields; a row is 'ImageId,PredictionString'"):
        imagenet(tmp_path, "val")
    path.write_text("\n".join(["ImageId,PredictionString,Score"] + lines[1:4]) + "\n")
    with pytest.raises(AnnotationError, match="header must be 'ImageId,PredictionString'"):
        read_solution_csv(path)


# --- VOC XML -------------------------------------------------------------------------------------


def test_non_numeric_voc_field_is_named_with_its_value(tmp_path):
    truth = write_imagenet(tmp_path, layout="flat", boxes="xml")
    stem = sorted(truth)[0]
    xml = tmp_path / "Annotations" / "CLS-LOC" / "val" / f"{stem}.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<ymax>", "<ymax>12a", 1))
    with pytest.raises(AnnotationError, match=rf"<ymax> of <bndbox> of <object> 1 in .*{stem}.xml is '12a\d+', not a number"):
        imagenet(tmp_path, "val")
    xml.write_text(text.replace("<width>", "<width>wide", 1))
    with pytest.raises(AnnotationError, match=rf"<width> of <size> in .*{stem}.xml is 'wide\d+', not a whole number"):
        imagenet(tmp_path, "val")


def test_voc_size_that_disagrees_with_the_image_fails_boxes_and_image_alike(tmp_path):
    truth = write_imagenet(tmp_path, layout="flat", boxes="xml")
    stem = sorted(truth)[0]
    _, _, (w, h) = truth[stem]
    xml = tmp_path / "Annotations" / "CLS-LOC" / "val" / f"{stem}.xml"
    xml.write_text(
        xml.read_text().replace(f"<width>{w}</width><height>{h}</height>", f"<width>{2 * w}</width><height>{2 * h}</height>")
    )
    ds = imagenet(tmp_path, "val")
    index = [s.path.stem for s in ds.samples].index(stem)
    reason = rf"{stem}.JPEG is {w}x{h} pixels but its annotation .*{stem}.xml\) says {2 * w}x{2 * h}"
    with pytest.raises(AnnotationError, match=reason):
        ds.box_list(index)
    with pytest.raises(AnnotationError, match=reason):
        ds[index]
    other = 1 if index == 0 else 0
    assert len(ds.box_list(other)) == 1 and ds[other][0].shape == (3, 224, 224), "the other images are unaffected"
