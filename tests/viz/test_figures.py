"""The figures of the analysis notebooks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from epviz import viz as plots
from epviz.tokens import TokenOrigin, TokenSet

PNG = b"\x89PNG\r\n\x1a\n"



def written(folder, name) -> pd.DataFrame:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    return pd.read_csv(folder / f"{name}.csv")


def points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))


# --- Figs. 2 and 3 -----------------------------------------------------------------------------


def zoo_results() -> pd.DataFrame:
    rows = []
    for b, backbone in enumerate(["tiny-random", "tiny-mae", "my-vit"]):
        for p, (probe, params, gflops) in enumerate([("cls", 1930, 4e-6), ("ep", 44938, 3e-4), ("mhca", 149578, 2e-3)]):
            rows.append(dict(backbone=backbone, probe=probe, params=params, gflops=gflops, test_acc=0.2 + 0.1 * b + 0.05 * p))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_accuracy_vs_cost_draws_one_labelled_point_per_probe_and_backbone(tmp_path, kind):
    results = zoo_results()
    draw = plots.accuracy_vs_params if kind == "params" else plots.accuracy_vs_flops
    fig = draw(results, out=tmp_path, name=f"fig_{kind}")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert points(ax) == len(results) == 9
    assert sorted(t.get_text() for t in ax.texts) == sorted(results["probe"])
    # one colour per backbone: the zoo's fixed colours, another one for a foreign backbone
    colours = {tuple(c.get_facecolor()[0][:3]) for c in ax.collections}
    assert len(colours) == 3 and tuple(to_rgb(plots.BACKBONE_PALETTE["tiny-random"])) in colours
    table = written(tmp_path, f"fig_{kind}")
    assert len(table) == 9 and set(table["backbone"]) == {"tiny-random", "tiny-mae", "my-vit"}


def test_accuracy_vs_cost_refuses_non_positive_costs_and_missing_columns():
    results = zoo_results()
    results.loc[0, "params"] = 0
    with pytest.raises(ValueError, match="positive"):
        plots.accuracy_vs_params(results)
    with pytest.raises(ValueError, match="test_acc"):
        plots.accuracy_vs_params(zoo_results().drop(columns="test_acc"))


# --- Fig. 4 ------------------------------------------------------------------------------------


def predictor_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for backbone in ["tiny-mae", "tiny-random"]:
        for probe, k in [("ep_d1", 4), ("mhca", 3), ("ep_d2", 4), ("ep_d4", 4)]:
            for j in range(k):
                loc = rng.random()
                rows.append(dict(backbone=backbone, probe=probe, predictor=j, maxboxacc_v2=loc, delta_acc=0.1 * loc,
                                 inbox_mass=rng.random(), chance_mass=0.3, entropy_norm=rng.random()))
    return pd.DataFrame(rows)


def test_delta_acc_panels_one_point_per_predictor_and_panel(tmp_path):
    table = predictor_rows()
    panels = {"attentive probes": ["ep_d1", "mhca"], "EP, D_o": ["ep_d1", "ep_d2", "ep_d4"]}
    fig = plots.delta_acc_panels(table, x="maxboxacc_v2", panels=panels, out=tmp_path, name="fig4")
    assert len(fig.axes) == 2 * 2
    counts = [points(ax) for ax in fig.axes]
    assert counts == [4 + 3, 4 + 4 + 4] * 2
    # a perfectly monotone relation in every panel shows rho = +1
    assert all(any(t.get_text() == "ρ = +1.00" for t in ax.texts) for ax in fig.axes)
    data = written(tmp_path, "fig4")
    assert len(data) == sum(counts)
    assert set(data["panel"]) == set(panels)
    assert (data.groupby(["backbone", "panel"]).size() == pd.Series({("tiny-mae", "EP, D_o"): 12, ("tiny-mae", "attentive probes"): 7,
                                                                      ("tiny-random", "EP, D_o"): 12, ("tiny-random", "attentive probes"): 7})).all()


def test_delta_acc_panels_chance_line_and_errors(tmp_path):
    table = predictor_rows()
    fig = plots.delta_acc_panels(table, x="inbox_mass")
    assert len(fig.axes) == 2  # one default panel per backbone
    assert points(fig.axes[0]) == 15
    vertical = [l for l in fig.axes[0].lines if np.allclose(l.get_xdata(), 0.3)]
    assert vertical, "the chance level of the in-box mass is drawn"
    with pytest.raises(ValueError, match="not in the table"):
        plots.delta_acc_panels(table, panels={"x": ["ep_d8"]})
    with pytest.raises(ValueError, match="empty"):
        plots.delta_acc_panels(table.iloc[:0])


# --- layer-wise and low-shot curves -------------------------------------------------------------


def sweep_runs() -> pd.DataFrame:
    rows = []
    for backbone in ["tiny-mae", "tiny-sup", "tiny-random"]:
        for probe in ["cls", "gap", "ep"]:
            for layer in range(4):
                for seed in (0, 1):
                    rows.append(dict(backbone=backbone, probe=probe, layer=layer, seed=seed, best_acc=0.1 * layer + 0.02 * seed))
    return pd.DataFrame(rows)


def test_layer_curves_one_line_per_probe_per_backbone(tmp_path):
    fig = plots.layer_curves(sweep_runs(), out=tmp_path, name="layers")
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert len(ax.lines) == 3
        assert all(len(line.get_xdata()) == 4 for line in ax.lines)
        np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.01, 0.11, 0.21, 0.31])
    summary = written(tmp_path, "layers")
    assert len(summary) == 3 * 3 * 4
    assert (summary["runs"] == 2).all()
    np.testing.assert_allclose(summary["best_acc_std"], np.std([0.0, 0.02], ddof=1))


def test_low_shot_curves_mean_and_std_over_seeds_on_a_log_axis(tmp_path):
    rows = [dict(backbone=b, probe=p, shots=k, seed=s, best_acc=0.1 * np.log(k + 1) + 0.01 * s)
            for b in ["tiny-mae", "tiny-random"] for p in ["cls", "ep"] for k in (1, 5, 25) for s in (0, 1, 2)]
    fig = plots.low_shot_curves(pd.DataFrame(rows), out=tmp_path, name="shots")
    assert len(fig.axes) == 2 and all(ax.get_xscale() == "log" for ax in fig.axes)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert len(fig.axes[0].collections) == 2, "one ± std band per line"
    summary = written(tmp_path, "shots")
    assert len(summary) == 2 * 2 * 3 and (summary["runs"] == 3).all()
    np.testing.assert_allclose(summary["best_acc_mean"], 0.1 * np.log(summary["shots"] + 1) + 0.01)
    np.testing.assert_allclose(summary["best_acc_std"], 0.01)


# --- complementary maps -------------------------------------------------------------------------


def test_query_group_gallery_layout_colours_and_data(tmp_path):
    n, k, grid = 2, 6, (4, 4)
    labels = np.array([0, 0, 1, 1, 2, 2])
    maps = np.full((n, k, 16), 1e-3)
    corners = {0: 0, 1: 3, 2: 15}  # group -> token it attends to: top-left, top-right, bottom-right
    for q in range(k):
        maps[:, q, corners[labels[q]]] = 1.0
    maps /= maps.sum(-1, keepdims=True)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    boxes = np.array([[2, 2, 20, 20], [4, 4, 30, 30]])
    fig = plots.query_group_gallery(images, maps, labels, grid, boxes=boxes, out=tmp_path, name="groups")
    columns = 2 + 3 + 6
    assert len(fig.axes) == n * columns
    composite = fig.axes[1].images[1].get_array()
    for group, (y, x) in {0: (0, 0), 1: (0, 31), 2: (31, 31)}.items():
        np.testing.assert_allclose(composite[y, x, :3], to_rgb(plots.GROUP_COLOURS[group]))
    assert all(len(ax.patches) == 1 for ax in fig.axes), "the GT box on every panel"
    data = written(tmp_path, "groups")
    assert len(data) == n * (3 + 6)
    groups = data[data["kind"] == "group"]
    np.testing.assert_allclose(groups["peak_weight"], 2 * maps[0, 0].max(), rtol=1e-5)  # two members each
    assert (groups["peak_token"].to_numpy() == np.tile([0, 3, 15], n)).all()


def test_query_group_gallery_checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        plots.query_group_gallery(np.zeros((1, 3, 8, 8), np.uint8), np.ones((1, 3, 4)) / 4, [0, 1], (2, 2))
