"""The figures of the analysis notebooks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from epviz import viz as plots

PNG = b"\x89PNG\r\n\x1a\n"


def written(folder, name) -> pd.DataFrame:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    return pd.read_csv(folder / f"{name}.csv")


def points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))


# --- Figs. 2 and 3: tests/viz/test_costs.py ----------------------------------------------------


# --- Fig. 4 ------------------------------------------------------------------------------------


def predictor_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for backbone in ["tiny-mae", "tiny-random"]:
        for probe, k in [("ep_d1", 4), ("mhca", 3), ("ep_d2", 4), ("ep_d4", 4)]:
            for j in range(k):
                loc = rng.random()
                rows.append(
                    dict(
                        backbone=backbone,
                        probe=probe,
                        predictor=j,
                        maxboxacc_v2=loc,
                        delta_acc=0.1 * loc,
                        inbox_mass=rng.random(),
                        chance_mass=0.3,
                        entropy_norm=rng.random(),
                    )
                )
    return pd.DataFrame(rows)


def test_delta_acc_panels_one_point_per_predictor_and_panel(tmp_path):
    table = predictor_rows()
    panels = {"attentive probes": ["ep_d1", "mhca"], "EP, D_o": ["ep_d1", "ep_d2", "ep_d4"]}
    fig = plots.delta_acc_panels(table, x="maxboxacc_v2", panels=panels, out=tmp_path, name="fig4")
    assert len(fig.axes) == 2 * 2
    counts = [points(ax) for ax in fig.axes]
    assert counts == [4 + 3, 4 + 4 + 4] * 2
    # a perfectly monotone relation: every probe of every panel shows its own rho = +1, never one pooled over probes
    assert [sum(t.get_text() == "ρ +1.00" for t in ax.texts) for ax in fig.axes] == [2, 3] * 2
    assert all(len(ax.get_legend().get_texts()) == len(members) for ax, members in zip(fig.axes, [*panels.values()] * 2))
    rhos = pd.DataFrame(dict(backbone="tiny-mae", probe="mhca", x="delta_acc", y="maxboxacc_v2", given=[None, "entropy_norm"],
                             rho=[1.0, 0.25], rho_lo=[0.5, -0.5], rho_hi=[1.0, 0.75]))  # fmt: skip
    fig = plots.delta_acc_panels(table, x="maxboxacc_v2", panels=panels, rhos=rhos)
    assert "ρ +1.00 [+0.50, +1.00]; ρ | entropy +0.25 [-0.50, +0.75]" in [t.get_text() for t in fig.axes[0].texts]
    with pytest.raises(ValueError, match="at most 5 probes"):
        plots.delta_acc_panels(table.assign(probe=table["predictor"].astype(str) + table["probe"]))
    data = written(tmp_path, "fig4")
    assert len(data) == sum(counts)
    assert set(data["panel"]) == set(panels)
    assert (
        data.groupby(["backbone", "panel"]).size()
        == pd.Series(
            {
                ("tiny-mae", "EP, D_o"): 12,
                ("tiny-mae", "attentive probes"): 7,
                ("tiny-random", "EP, D_o"): 12,
                ("tiny-random", "attentive probes"): 7,
            }
        )
    ).all()


def test_delta_acc_panels_chance_line_and_errors(tmp_path):
    table = predictor_rows()
    fig = plots.delta_acc_panels(table, x="inbox_mass")
    assert len(fig.axes) == 2  # one default panel per backbone
    assert points(fig.axes[0]) == 15
    vertical = [line for line in fig.axes[0].lines if np.allclose(line.get_xdata(), 0.3)]
    assert vertical, "the chance level of the in-box mass is drawn"
    with pytest.raises(ValueError, match="not in the table"):
        plots.delta_acc_panels(table, panels={"x": ["ep_d8"]})
    with pytest.raises(ValueError, match="empty"):
        plots.delta_acc_panels(table.iloc[:0])


def test_delta_acc_panels_draws_the_baselines_of_its_panels(tmp_path):
    table = predictor_rows()
    common = pd.DataFrame(
        dict(baseline=["uniform", "centre prior"], maxboxacc_v2=[0.0, 0.41], inbox_mass=[0.3, 0.45], pointing=[0.02, 0.8])
    )
    matched = pd.DataFrame(
        dict(
            baseline=["random, matched entropy"] * 3,
            backbone=["tiny-mae", "tiny-mae", "tiny-random"],
            probe=["mhca", "ep_d1", "mhca"],
            maxboxacc_v2=[0.21, 0.23, 0.25],
            inbox_mass=[0.31, 0.32, 0.33],
        )
    )
    baselines = pd.concat([common, matched], ignore_index=True)
    panels = {"attentive probes": ["ep_d1", "mhca"], "EP, D_o": ["ep_d2", "ep_d4"]}
    fig = plots.delta_acc_panels(table, x="maxboxacc_v2", panels=panels, baselines=baselines, out=tmp_path, name="loc")

    def vertical(ax):
        return sorted(
            round(float(line.get_xdata()[0]), 3)
            for line in ax.lines
            if len(set(line.get_xdata())) == 1 and line.get_label().startswith(("uniform", "centre", "random"))
        )

    mae_probes, mae_ep, random_probes, random_ep = fig.axes
    assert vertical(mae_probes) == [0.0, 0.21, 0.23, 0.41]  # both matched baselines of the panel's probes
    assert vertical(mae_ep) == [0.0, 0.41]  # no matched baseline: its probes have none
    assert vertical(random_probes) == [0.0, 0.25, 0.41]
    labels = [line.get_label() for line in mae_probes.lines]
    assert "random, matched entropy (mhca)" in labels and "centre prior" in labels
    data = written(tmp_path, "loc")
    lines = data[data["baseline"].notna()]
    assert len(lines) == 4 + 2 + 3 + 2 and lines["delta_acc"].isna().all()
    assert len(data) - len(lines) == 2 * (7 + 8)
    # in-box mass: the uniform map is the chance line already drawn, once
    fig = plots.delta_acc_panels(table, x="inbox_mass", baselines=baselines)
    at_chance = [line for line in fig.axes[0].lines if np.allclose(line.get_xdata(), 0.3)]
    assert len(at_chance) == 1 and "chance" in at_chance[0].get_label()
    assert any(np.allclose(line.get_xdata(), 0.45) for line in fig.axes[0].lines)
    # entropy: the random maps match it by construction, nothing drawn
    fig = plots.delta_acc_panels(table, x="entropy_norm", baselines=baselines.assign(entropy_norm=0.5))
    assert not any(line.get_label().startswith(("uniform", "centre", "random")) for line in fig.axes[0].lines)


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


def test_sweep_curves_draw_the_run_and_its_references(tmp_path):
    rows = [dict(backbone=f"mae@{e}", epoch=e, run="mae", seed=s, acc=0.5 + e / 100 + s / 100, lift=0.4) for e in (0, 2, 7)
            for s in (0, 1)]  # fmt: skip
    rows += [dict(backbone="sup", epoch=np.nan, run="sup", seed=s, acc=0.7 + s / 50, lift=0.45) for s in (0, 1)]
    fig = plots.sweep_curves(pd.DataFrame(rows), "epoch", {"acc": "top-1", "lift": "lift"}, "epochs", line="run", out=tmp_path,
                             name="sweep")  # fmt: skip
    assert len(fig.axes) == 2
    curve = fig.axes[0].containers[0].lines[0]
    np.testing.assert_allclose(np.asarray(curve.get_xdata(), float), [0, 2, 7])
    np.testing.assert_allclose(np.asarray(curve.get_ydata(), float), [0.505, 0.525, 0.575])
    assert any(np.allclose(line.get_ydata(), 0.71) for line in fig.axes[0].lines), "the reference at its mean"
    data = written(tmp_path, "sweep")
    assert len(data) == 2 * (3 + 1) and set(data["measure"]) == {"acc", "lift"}
    with pytest.raises(ValueError, match="two or more values"):
        plots.sweep_curves(pd.DataFrame(rows[:2]), "epoch", {"acc": "top-1"}, "epochs")


def test_curves_draw_the_chance_accuracy_when_the_classes_are_known(tmp_path):
    runs = sweep_runs().assign(num_classes=10)
    fig = plots.layer_curves(runs, out=tmp_path, name="layers_chance")
    for ax in fig.axes:
        chance = [line for line in ax.lines if np.allclose(line.get_ydata(), 0.1)]
        assert len(chance) == 1 and chance[0].get_label().startswith("chance")
        assert any(t.get_text().startswith("chance") for t in ax.get_legend().get_texts())
    assert (written(tmp_path, "layers_chance")["chance"] == 0.1).all()
    rows = [dict(backbone="tiny-mae", probe="ep", shots=k, seed=0, best_acc=0.5) for k in (1, 5)]
    fig = plots.low_shot_curves(pd.DataFrame(rows), chance=0.25)
    assert any(np.allclose(line.get_ydata(), 0.25) for line in fig.axes[0].lines)
    assert len(plots.layer_curves(sweep_runs()).axes[0].lines) == 3, "no classes known: no chance line"
    with pytest.raises(ValueError, match="different numbers of classes"):
        plots.layer_curves(runs.assign(num_classes=np.where(runs["seed"] == 0, 10, 5)))


def test_low_shot_curves_mean_and_std_over_seeds_on_a_log_axis(tmp_path):
    rows = [
        dict(backbone=b, probe=p, shots=k, seed=s, best_acc=0.1 * np.log(k + 1) + 0.01 * s)
        for b in ["tiny-mae", "tiny-random"]
        for p in ["cls", "ep"]
        for k in (1, 5, 25)
        for s in (0, 1, 2)
    ]
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
