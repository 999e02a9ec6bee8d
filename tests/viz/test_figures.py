"""The figures of the analysis notebooks, and the shared experimental set-up (epviz.experiments)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb

from epviz import experiments, viz as plots
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


# --- epviz.experiments ----------------------------------------------------------------------------


def test_dataset_seam_rejects_unknown_specs_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="cluttered-fashion-mnist") as err:
        experiments.load_dataset("imagenet-val", "test", 4)
    assert "imagenet-val" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        experiments.load_dataset(split="validation", size=4)
    with pytest.raises(ValueError, match="unknown dataset"):
        experiments.standard_sets(True, dataset="cub200")


def test_standard_splits_are_deterministic_and_distinct():
    a = experiments.load_dataset(split="val", size=12)
    b = experiments.load_dataset(split="val", size=12)
    train = experiments.load_dataset(split="train", size=12)
    test = experiments.load_dataset(split="test", size=12)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    assert (a.split, a.seed, train.split, train.seed, test.split, test.seed) == ("train", 1, "train", 0, "test", 0)
    assert not torch.equal(a.images, train.images), "val holds other canvases than train"


def test_fast_sizes_are_small_and_full_sizes_are_the_standard_ones():
    assert experiments.set_sizes(False) == {"train": 20_000, "val": 2_000, "test": 4_000}
    fast = experiments.set_sizes(True)
    assert all(fast[s] < experiments.FULL_SIZES[s] for s in experiments.SPLITS)
    sets = experiments.standard_sets(True, splits=("val", "test"))
    assert list(sets) == ["val", "test"]
    assert len(sets["val"]) == fast["val"] and len(sets["test"]) == fast["test"]
    assert sets["val"].fingerprint() == experiments.load_dataset(split="val", size=fast["val"]).fingerprint()


def test_budget_and_fast_switch(monkeypatch):
    full, fast = experiments.budget(False), experiments.budget(True)
    assert full["epochs"] == 15 and full["precision"] == "bf16" and full["batch_size"] == 256
    assert fast["epochs"] < full["epochs"] and fast["precision"] == "fp32"
    assert experiments.budget(True, lr=0.5)["lr"] == 0.5
    assert experiments.budget(False)["optimizer"] == "adamw" and experiments.budget(False)["weight_decay"] == 1e-4
    monkeypatch.setenv("EPVIZ_FAST", "1")
    assert experiments.is_fast()
    monkeypatch.setenv("EPVIZ_FAST", "0")
    assert not experiments.is_fast()


def test_present_backbones_leaves_out_zoo_models_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.zoo, "zoo_weights", lambda name: tmp_path / f"{name}.safetensors")
    (tmp_path / "tiny-sup.safetensors").write_bytes(b"")
    (tmp_path / "tiny-sup.json").write_text("{}")
    (tmp_path / "tiny-mae.safetensors").write_bytes(b"")  # weights without a model card are not loadable
    with pytest.warns(UserWarning, match="tiny-mae"):
        kept = experiments.present_backbones(["tiny-mae", "tiny-sup", "tiny-random", "vit_small_patch16_224"])
    assert kept == ["tiny-sup", "tiny-random", "vit_small_patch16_224"]


def test_probe_specs():
    specs = experiments.probe_specs(["cls", "ep"])
    assert specs == {"cls": {"name": "cls"}, "ep": {"name": "ep", "num_queries": experiments.EP_QUERIES}}
    assert experiments.probe_specs(experiments.EP_VARIANTS)["ep_d4"] == {"name": "ep", "num_queries": 16, "d_out": 4}
    with pytest.raises(ValueError, match="unknown probe"):
        experiments.probe_specs(["ep", "epp"])


def toy_tokens(n: int, seed: int, layer: int = 1) -> tuple[TokenSet, np.ndarray]:
    """Class-coded tokens placed inside a box (the rest noise), and those boxes on a 32x32 image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(7).normal(size=(3, 32)) * 3
    patch = rng.normal(size=(n, 16, 32))
    patch[:, :4] += centres[labels][:, None]  # the first grid row carries the class
    boxes = np.tile([0.0, 0.0, 32.0, 8.0], (n, 1))
    ts = TokenSet(patch=patch.astype(np.float32), prefix=patch[:, :1].mean(1, keepdims=True).astype(np.float32),
                  labels=labels, grid=(4, 4), num_classes=3, origin=TokenOrigin(backbone="toy", layer=layer))
    return ts, boxes


class Boxes:
    def __init__(self, boxes):
        self.boxes, self.image_size = boxes, 32

    def __len__(self):
        return len(self.boxes)


def test_train_probe_and_probe_zoo_use_the_budget_and_report_every_probe():
    train, _ = toy_tokens(120, 0)
    val, _ = toy_tokens(60, 1)
    result = experiments.train_probe("ep", train, val, True, num_queries=4, fit_options=dict(epochs=3, batch_size=32))
    assert result.config["optimizer"] == "adamw" and result.config["epochs"] == 3 and result.config["weight_decay"] == 1e-4
    assert result.probe.num_queries == 4 and result.probe.grid == (4, 4)
    table, fitted = experiments.probe_zoo({"toy": {"train": train, "val": val, "test": val}},
                                          {"gap": None, "ep4": {"name": "ep", "num_queries": 4}}, True,
                                          fit_options=dict(epochs=3, batch_size=32))
    assert list(table["probe"]) == ["gap", "ep4"] and list(table["name"]) == ["gap", "ep"]
    assert table["test_acc"].between(0, 1).all() and (table["params"] > 0).all()
    assert set(fitted) == {("toy", "gap"), ("toy", "ep4")}
    assert table["test_acc"].max() > 0.6, "class-coded tokens are learnt"


def test_predictor_table_has_every_measure_for_every_predictor():
    train, _ = toy_tokens(150, 0)
    test, boxes = toy_tokens(30, 2)
    probe = experiments.train_probe("ep", train, train, True, num_queries=4, fit_options=dict(epochs=4, batch_size=50)).probe
    table = experiments.predictor_table(probe, test, Boxes(boxes), context=dict(backbone="toy", layer=1, probe="ep4", seed=0),
                                        thresholds=experiments.localization_thresholds(True))
    assert list(table["predictor"]) == [0, 1, 2, 3]
    for column in ("delta_acc", "maxboxacc_v2", "inbox_mass", "chance_mass", "pointing", "entropy", "entropy_norm"):
        assert table[column].notna().all(), column
    assert table["entropy_norm"].between(0, 1 + 1e-9).all() and table["maxboxacc_v2"].between(0, 1).all()
    np.testing.assert_allclose(table["chance_mass"], 0.25)
    np.testing.assert_allclose(table["delta_acc"], table["acc_full"] - table["acc_uniform"])
    assert (table[["backbone", "probe"]] == ["toy", "ep4"]).all().all()
    subset = experiments.predictor_table(probe, test, Boxes(boxes), index=range(10), thresholds=[0.5])
    assert (subset["n_images"] == 10).all() and (subset["n_images_localization"] == 10).all()
    cheap = experiments.predictor_table(probe, test, Boxes(boxes), localization_index=range(6), thresholds=[0.5])
    assert (cheap["n_images"] == 30).all() and (cheap["n_images_localization"] == 6).all()
    np.testing.assert_allclose(cheap["delta_acc"], table["delta_acc"])


def test_predictor_tables_cover_every_attentive_probe_and_skip_the_others():
    train, _ = toy_tokens(90, 0)
    test, boxes = toy_tokens(20, 2)
    tokens = {"toy": {"train": train, "val": train, "test": test}}
    _, fitted = experiments.probe_zoo(tokens, {"gap": None, "ep4": {"name": "ep", "num_queries": 4}, "mhca": None}, True,
                                      fit_options=dict(epochs=1, batch_size=30))
    table = experiments.predictor_tables(fitted, tokens, Boxes(boxes), thresholds=[0.2, 0.6])
    expected = {"ep4": 4, "mhca": fitted["toy", "mhca"].num_predictors}
    assert table.groupby("probe").size().to_dict() == expected
    assert (table["layer"] == 1).all() and table["delta_acc"].notna().all()
    with pytest.raises(ValueError, match="attention predictors"):
        experiments.predictor_tables({("toy", "gap"): fitted["toy", "gap"]}, tokens, Boxes(boxes))


def test_probe_costs_rank_ep_below_mhca(test_vit_backbone):
    costs = experiments.probe_costs(["cls", "ep", "mhca"], test_vit_backbone, 10)
    assert list(costs["probe"]) == ["cls", "ep", "mhca"] and (costs["backbone"] == "test_vit").all()
    cost = costs.set_index("probe")
    d, c = test_vit_backbone.dim, 10
    assert cost.loc["cls", "params"] == d * c + c
    assert cost.loc["ep", "pool_params"] == experiments.EP_QUERIES * d + d * d
    assert cost.loc["ep", "flops"] < cost.loc["mhca", "flops"]
    assert (cost["backbone_flops"] > 0).all() and cost["throughput"].isna().all()


def test_zoo_caches_extract_every_block_once(tmp_path, monkeypatch, small_canvases, test_vit_backbone):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    sets = {"train": small_canvases}
    caches = experiments.zoo_caches([test_vit_backbone], True, sets=sets, splits=("train",))
    cache = caches["test_vit"]["train"]
    assert not cache.hit and cache.layers == list(range(test_vit_backbone.depth))
    tokens = experiments.zoo_tokens([test_vit_backbone], 2, True, sets=sets, splits=("train",))
    ts = tokens["test_vit"]["train"]
    assert ts.origin.layer == 2 and len(ts) == len(small_canvases) and ts.dim == test_vit_backbone.dim
    last = experiments.zoo_tokens([test_vit_backbone], -1, True, sets=sets, splits=("train",))["test_vit"]["train"]
    assert last.origin.layer == test_vit_backbone.depth - 1
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1, "every layer and call shares one cache"
    with pytest.raises(ValueError, match="no dataset"):
        experiments.zoo_caches([test_vit_backbone], True, sets=sets, splits=("train", "test"))
