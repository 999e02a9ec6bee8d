import numpy as np
import pandas as pd

from epviz import viz as plots


def test_save_figure_writes_png_and_csv_atomically(tmp_path, small_canvases):
    fig = plots.canvas_gallery(small_canvases, count=10, columns=5, out=tmp_path, name="gallery")
    assert len(fig.axes) == 10
    png, csv = tmp_path / "gallery.png", tmp_path / "gallery.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(csv)
    assert len(table) == 10 and table["box_area_fraction"].between(0, 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.csv", "gallery.png"], "no temporary files left"


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
