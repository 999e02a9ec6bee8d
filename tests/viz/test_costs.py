"""Figs. 2 and 3: one panel per backbone, the accuracy-cost frontier, EP set apart, readable labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer
from matplotlib.markers import MarkerStyle
from matplotlib.text import Text

from epviz import viz as plots
from epviz.viz.costs import EP_STYLE, is_ep, pareto_frontier

PNG = b"\x89PNG\r\n\x1a\n"

# the zoo's 18 probes at D = 192, C = 10: trainable parameters and probe GFLOPs per image
COSTS = {
    "abmilp": (186827, 0.026792),
    "aim": (75850, 0.009490),
    "cae": (151306, 0.009638),
    "cait": (447754, 0.010376),
    "cbam": (6638, 0.000035),
    "clip": (163018, 0.009786),
    "cls": (1930, 0.000004),
    "coca": (260938, 0.003674),
    "dinovit": (446218, 0.059773),
    "dolg": (39563, 0.004747),
    "ep16": (41866, 0.000864),
    "ep_all16": (41866, 0.000876),
    "esimpool": (2314, 0.000053),
    "gap": (1930, 0.000004),
    "jepa": (446986, 0.010227),
    "mhca": (149578, 0.009638),
    "siglip": (446218, 0.010227),
    "simpool": (76042, 0.004845),
}


def zoo_table(std: bool = False) -> pd.DataFrame:
    """18 probes x 3 backbones with accuracies clustered in the upper right, as in the full run."""
    rng = np.random.default_rng(0)
    rows = []
    for backbone, base in [("tiny-mae", 0.6), ("tiny-sup", 0.72), ("tiny-random", 0.45)]:
        for probe, (params, gflops) in COSTS.items():
            acc = base + 0.04 * np.log10(params / 1930) + rng.normal(0, 0.02)
            row = dict(
                backbone=backbone,
                probe=probe,
                name=probe,
                params=params,
                gflops=gflops,
                test_acc=min(acc, 0.95),
                num_classes=10,
                predictors=0 if probe in ("cls", "gap") else 1,
            )
            if std:
                row["test_acc_std"] = 0.01 if probe in ("cls", "gap", "ep16", "mhca") else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def written(folder, name) -> pd.DataFrame:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    return pd.read_csv(folder / f"{name}.csv")


def offsets(ax) -> list[np.ndarray]:
    return [c.get_offsets() for c in ax.collections if hasattr(c, "get_offsets") and len(c.get_offsets())]


def test_pareto_frontier_by_hand():
    cost = [1, 2, 2, 3, 4, 4, 5]
    acc = [0.5, 0.4, 0.6, 0.6, 0.7, 0.7, 0.65]
    # (2, .4) is beaten by (1, .5); (3, .6) by (2, .6); (5, .65) by (4, .7); the two (4, .7) tie and both stay
    assert pareto_frontier(cost, acc).tolist() == [True, False, True, False, True, True, False]
    assert pareto_frontier([1.0], [0.3]).tolist() == [True]
    assert pareto_frontier([1, np.nan], [0.3, 0.9]).tolist() == [True, False]


def test_is_ep_recognises_every_ep_variant_and_nothing_else():
    names = ["ep", "ep16", "ep_all16", "ep16_d2", "EP32", "esimpool", "mhca", "cls", "jepa", "dep"]
    assert is_ep(names).tolist() == [True] * 5 + [False] * 5


def test_csv_marks_frontier_points_of_a_hand_made_table(tmp_path):
    table = pd.DataFrame(
        dict(
            backbone=["a"] * 5 + ["b"] * 3,
            probe=["cls", "gap", "ep16", "mhca", "jepa", "cls", "ep16", "mhca"],
            params=[10, 10, 100, 1000, 5000, 10, 100, 1000],
            test_acc=[0.30, 0.35, 0.60, 0.55, 0.70, 0.80, 0.70, 0.75],
        )
    )
    fig = plots.accuracy_vs_params(table, out=tmp_path, name="front")
    data = written(tmp_path, "front").set_index(["backbone", "probe"])
    assert data["frontier"].to_dict() == {
        ("a", "cls"): False,
        ("a", "gap"): True,
        ("a", "ep16"): True,
        ("a", "mhca"): False,
        ("a", "jepa"): True,
        ("b", "cls"): True,
        ("b", "ep16"): False,
        ("b", "mhca"): False,
    }
    assert data["ep"].to_dict()[("a", "ep16")] and not data["ep"].to_dict()[("a", "mhca")]
    # labelled: the frontier, EP and the always-labelled probes; all of them here
    assert data["labelled"].all()
    # the frontier's step line runs through the frontier points of each backbone, in cost order
    ax = fig.axes[0]
    step = [line for line in ax.lines if line.get_drawstyle() == "steps-post"]
    assert len(step) == 1
    np.testing.assert_allclose(step[0].get_xdata()[:-1], [10, 100, 5000])
    np.testing.assert_allclose(step[0].get_ydata(), [0.35, 0.60, 0.70, 0.70])
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)


def test_ep_has_its_own_marker_and_the_others_do_not(tmp_path):
    fig = plots.accuracy_vs_params(zoo_table())
    star = MarkerStyle("*")
    star_path = star.get_path().transformed(star.get_transform())
    for ax in fig.axes[:3]:
        starred = [
            c
            for c in ax.collections
            if len(c.get_offsets())
            and c.get_paths()[0].vertices.shape == star_path.vertices.shape
            and np.allclose(c.get_paths()[0].vertices, star_path.vertices)
        ]
        assert len(starred) == 1, "one star collection per panel: EP"
        ep = starred[0]
        assert len(ep.get_offsets()) == 2  # ep16 and ep_all16
        np.testing.assert_allclose(ep.get_offsets()[:, 0], [COSTS["ep16"][0], COSTS["ep_all16"][0]])
        np.testing.assert_allclose(ep.get_facecolor()[0][:3], to_rgb(EP_STYLE["color"]))
        assert all(
            not np.allclose(c.get_facecolor()[0][:3], to_rgb(EP_STYLE["color"]))
            for c in ax.collections
            if c is not ep and len(c.get_offsets()) and len(c.get_facecolor())
        )
        # every probe is drawn once
        assert sum(len(o) for o in offsets(ax)) == len(COSTS)
        ep_labels = [t for t in ax.texts if t.get_text() in ("ep16", "ep_all16")]
        assert len(ep_labels) == 2 and all(t.get_fontweight() == "bold" for t in ep_labels)


def test_error_bars_appear_with_std_columns_only():
    fig = plots.accuracy_vs_params(zoo_table(std=True))
    for ax in fig.axes[:3]:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 1
        segments = bars[0].lines[2][0].get_segments()
        assert len(segments) == 4, "the four probes with a std, not the NaN ones"
        np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 0.02)
    assert "mean ± std" in fig.axes[0].get_ylabel()
    plain = plots.accuracy_vs_params(zoo_table())
    assert not any(isinstance(c, ErrorbarContainer) for ax in plain.axes for c in ax.containers)
    # an interval (lo, hi) draws asymmetric bars
    table = zoo_table().assign(test_acc_lo=lambda d: d["test_acc"] - 0.01, test_acc_hi=lambda d: d["test_acc"] + 0.03)
    figure = plots.accuracy_vs_flops(table)
    assert "std" not in figure.axes[0].get_ylabel(), "single runs' bars are intervals: the label claims no std"
    bars = [c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)]
    segments = bars[0].lines[2][0].get_segments()
    assert len(segments) == len(COSTS)
    np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in segments], 0.04)
    # std for the repeated probes, the bootstrap interval of single runs for the others
    mixed = zoo_table(std=True).assign(test_acc_lo=lambda d: d["test_acc"] - 0.01, test_acc_hi=lambda d: d["test_acc"] + 0.03)
    fig = plots.accuracy_vs_params(mixed)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    heights = sorted(round(s[1, 1] - s[0, 1], 6) for s in bars[0].lines[2][0].get_segments())
    assert heights == [0.02] * 4 + [0.04] * (len(COSTS) - 4)
    assert any("bootstrap interval for single runs" in t.get_text() for t in fig.legends[0].get_texts())
    assert "std" not in fig.axes[0].get_ylabel(), "some bars are intervals: the axis label leaves it to the legend"


def test_chance_line_and_legend_entry(tmp_path):
    fig = plots.accuracy_vs_flops(zoo_table(), out=tmp_path, name="fig3")
    for ax in fig.axes[:3]:
        assert any(np.allclose(line.get_ydata(), 0.1) and line.get_linestyle() == ":" for line in ax.lines)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("chance") for t in legend) and any(t.startswith("EP") for t in legend)
    assert any(t.startswith("frontier") for t in legend)
    data = written(tmp_path, "fig3")
    assert len(data) == 3 * len(COSTS) and (data["chance"] == 0.1).all()
    explicit = plots.accuracy_vs_params(zoo_table().drop(columns="num_classes"), chance=0.25)
    assert any(np.allclose(line.get_ydata(), 0.25) for line in explicit.axes[0].lines)
    none = plots.accuracy_vs_params(zoo_table().drop(columns="num_classes"))
    assert not any(t.get_text().startswith("chance") for t in none.legends[0].get_texts())


def test_labels_do_not_overlap_on_a_crowded_zoo(tmp_path):
    fig = plots.accuracy_vs_params(zoo_table(), out=tmp_path, name="fig2")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    data = written(tmp_path, "fig2")
    for ax, backbone in zip(fig.axes, ["tiny-mae", "tiny-sup", "tiny-random"]):
        labelled = data[(data["backbone"] == backbone) & data["labelled"]]
        assert sorted(t.get_text() for t in ax.texts) == sorted(labelled["probe"])
        assert {"cls", "gap", "mhca", "ep16", "ep_all16"} <= {t.get_text() for t in ax.texts}
        assert len(ax.texts) < len(COSTS), "the rest are only in the CSV"
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text alone, not its leader line
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())


def test_accuracy_vs_cost_refuses_non_positive_costs_and_missing_columns():
    results = zoo_table()
    results.loc[0, "params"] = 0
    with pytest.raises(ValueError, match="positive"):
        plots.accuracy_vs_params(results)
    with pytest.raises(ValueError, match="test_acc"):
        plots.accuracy_vs_params(zoo_table().drop(columns="test_acc"))
