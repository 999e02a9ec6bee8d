import numpy as np
import pandas as pd
import pytest

from epviz import viz as plots


def test_save_figure_writes_png_and_csv_atomically(tmp_path, small_canvases):
    fig = plots.canvas_gallery(small_canvases, count=10, columns=5, out=tmp_path, name="gallery")
    assert len(fig.axes) == 10
    png, csv = tmp_path / "gallery.png", tmp_path / "gallery.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(csv)
    assert len(table) == 10 and table["box_area_fraction"].between(0, 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.csv", "gallery.json", "gallery.png"], "no temporary files left"


def test_every_png_has_a_sidecar_with_the_commit_and_the_images_shown(tmp_path, small_canvases):
    from epviz.provenance import git_commit, read_sidecar

    plots.canvas_gallery(small_canvases, count=6, columns=3, out=tmp_path, name="gallery")
    maps = np.full((3, 2, 64), 1 / 64)
    shown = [11, 5, 40]
    plots.attention_overlays(small_canvases.images[shown], maps, (8, 8), out=tmp_path, name="chosen", index=shown)
    plots.attention_overlays(small_canvases.images[:2], maps[:2], (8, 8), out=tmp_path, name="first")
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.stem for p in pngs] == ["chosen", "first", "gallery"]
    for png in pngs:
        doc = read_sidecar(png)
        assert doc["figure"] == png.stem and doc["commit"] == git_commit() and doc["files"]["png"]["name"] == png.name
    gallery = read_sidecar(tmp_path / "gallery.png")
    assert gallery["images"] == list(range(6)) and gallery["images_are"] == "dataset positions"
    assert gallery["dataset"] == small_canvases.fingerprint() and gallery["sources"]["images"] == "given"
    assert read_sidecar(tmp_path / "chosen.png")["images"] == shown
    first = read_sidecar(tmp_path / "first.png")
    assert first["images"] == [0, 1] and "pass index=" in first["images_are"]


def test_an_index_that_does_not_fit_the_images_is_refused(small_canvases):
    maps = np.full((3, 2, 64), 1 / 64)
    with pytest.raises(ValueError, match="one per image"):
        plots.attention_overlays(small_canvases.images[:3], maps, (8, 8), index=[1, 2])


def test_the_query_group_gallery_records_its_images(tmp_path, small_canvases):
    from epviz.provenance import read_sidecar

    maps = np.random.default_rng(0).random((2, 4, 64))
    maps /= maps.sum(-1, keepdims=True)
    plots.query_group_gallery(
        small_canvases.images[[7, 9]], maps, [0, 0, 1, 1], (8, 8), out=tmp_path, name="groups", index=[7, 9]
    )
    assert read_sidecar(tmp_path / "groups.png")["images"] == [7, 9]


def test_no_output_folder_means_nothing_written(tmp_path, small_canvases, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plots.canvas_gallery(small_canvases, count=4)
    assert list(tmp_path.iterdir()) == []


def test_upsample_maps_keeps_the_peak_where_it_was():
    maps = np.zeros((2, 16))
    maps[0, 0] = 1.0  # top-left token
    maps[1, 15] = 1.0  # bottom-right token
    up = plots.upsample_maps(maps, (4, 4), (32, 32))
    assert up.shape == (2, 32, 32) and up.min() >= 0 and up.max() <= 1
    assert np.unravel_index(up[0].argmax(), (32, 32))[0] < 8
    assert np.unravel_index(up[1].argmax(), (32, 32))[0] >= 24


def test_attention_overlays_shape_and_data(tmp_path, small_canvases):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 64))
    maps /= maps.sum(-1, keepdims=True)
    fig = plots.attention_overlays(
        small_canvases.images[:3], maps, (8, 8), boxes=small_canvases.boxes[:3], queries=[0, 4], out=tmp_path
    )
    assert len(fig.axes) == 3 * 4
    table = pd.read_csv(tmp_path / "attention_overlays.csv")
    assert len(table) == 3 * 5 and (table["max_weight"] <= 1).all()


def test_zoo_overview_draws_one_bar_per_row(tmp_path):
    table = pd.DataFrame(
        {
            "backbone": ["tiny-mae", "tiny-random"] * 2,
            "probe": ["cls", "cls", "ep:16", "ep:16"],
            "test_acc": [0.5, 0.3, 0.7, 0.6],
            "num_classes": 10,
        }
    )
    fig = plots.zoo_overview(table, out=tmp_path)
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0]
    assert sorted(round(b.get_height(), 2) for b in bars) == [0.3, 0.5, 0.6, 0.7]
    assert (tmp_path / "zoo_probe_accuracy.csv").is_file()
