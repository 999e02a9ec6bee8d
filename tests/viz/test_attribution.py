"""Figures of the attribution analyses: files written, data behind them, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from epviz.viz import attribution as pa

PNG = b"\x89PNG\r\n\x1a\n"
GRID = (4, 4)


def written(folder, name) -> pd.DataFrame:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    return pd.read_csv(folder / f"{name}.csv")


def test_importance_scatter_has_a_panel_per_backbone_and_a_point_per_predictor(tmp_path):
    rows = [
        dict(backbone=b, layer=-1, probe="ep", seed=0, predictor=j, delta_acc=0.01 * j, importance_acc=0.02 * j * s)
        for b, s in (("tiny-random", 1), ("tiny-mae", -1))
        for j in range(5)
    ]
    fig = pa.importance_vs_delta_acc(pd.DataFrame(rows), out=tmp_path, name="imp")
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["tiny-mae", "tiny-random"]  # zoo order
    assert "-1.00" in fig.axes[0].get_title() and "1.00" in fig.axes[1].get_title()
    assert all(len(ax.collections[0].get_offsets()) == 5 for ax in fig.axes)
    data = written(tmp_path, "imp")
    assert len(data) == 10 and {"predictor", "delta_acc", "importance_acc"} <= set(data.columns)
    with pytest.raises(ValueError, match="needs the columns"):
        pa.importance_vs_delta_acc(pd.DataFrame(rows).drop(columns="delta_acc"))


def test_token_image_repeats_each_token_over_its_patch():
    values = np.arange(16, dtype=np.float32)[None] - 8
    up = pa.token_image(values, GRID, (8, 8))
    assert up.shape == (1, 8, 8) and up[0, 0, 0] == -8 and up[0, 7, 7] == 7 and up[0, 1, 3] == -7
    with pytest.raises(ValueError, match="multiple of the grid"):
        pa.token_image(values, GRID, (9, 8))


def test_attribution_gallery_writes_one_row_per_image(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 3, 16, 16), dtype=np.uint8)
    maps = rng.random((3, 2, 16))
    maps /= maps.sum(-1, keepdims=True)
    attr = rng.normal(size=(3, 16))
    attr[0] = maps[0].mean(0)  # identical ranking: perfect agreement
    fig = pa.attribution_gallery(images, attr, maps, GRID, boxes=np.array([[2, 2, 10, 10]] * 3), k=4, out=tmp_path, name="gal")
    assert len(fig.axes) >= 12
    data = written(tmp_path, "gal")
    assert len(data) == 3 and data.loc[0, "spearman"] == pytest.approx(1.0) and data.loc[0, "topk_overlap"] == 1.0
    with pytest.raises(ValueError, match="same n and N"):
        pa.attribution_gallery(images, attr[:, :8], maps, GRID)
    evidence = rng.normal(size=(3, 16))
    fig = pa.attribution_gallery(images, attr, maps, GRID, k=4, out=tmp_path, name="ev", evidence=evidence)
    assert [ax.get_title() for ax in fig.axes[:5]][2:4] == ["relevance (IG)", "exact evidence"]
    data = written(tmp_path, "ev")
    np.testing.assert_allclose(data["evidence_sum"], evidence.sum(-1), rtol=1e-5)
    assert (data["max_evidence_token"] == evidence.argmax(-1)).all()
    with pytest.raises(ValueError, match="same n and N"):
        pa.attribution_gallery(images, attr, maps, GRID, evidence=evidence[:, :8])


def test_agreement_summary_keeps_the_mean_map_rows(tmp_path):
    rows = [
        dict(
            backbone=b,
            layer=-1,
            probe="ep",
            seed=0,
            image=i,
            map=m,
            spearman=0.1 * i,
            topk_overlap=0.25,
            k=4,
            chance_overlap=0.25,
        )
        for b in ("tiny-mae", "tiny-random")
        for i in range(4)
        for m in ("mean", "predictor 0")
    ]
    pa.agreement_summary(pd.DataFrame(rows), out=tmp_path, name="agr")
    data = written(tmp_path, "agr")
    assert len(data) == 8 and set(data["map"]) == {"mean"}
