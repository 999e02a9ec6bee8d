"""Many trainings in one table: the probe zoo, layer sweeps, low-shot sampling and runs, aggregation."""

import numpy as np
import pandas as pd
import pytest
import torch

from epviz.errors import ConfigError
from epviz.evaluate import knn_predict, predict
from epviz.probes import probe_specs
from epviz.setting import Setting
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import (
    aggregate_runs,
    layer_sweep,
    low_shot,
    probe_cache,
    probe_zoo,
    sample_per_class,
    seed_summary,
    train_probe,
)
from epviz.training.runs import held_out_scores
from tests.toy_tokens import toy_tokens

D, N, C = 16, 16, 3
FIT = dict(epochs=3, batch_size=50, optimizer="adamw", lr=1e-2, warmup_epochs=0, device="cpu", progress=False)


def make_tokens(n: int, signal: float, seed: int, layer: int) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    centres = np.random.default_rng(99).normal(size=(C, D)) * signal
    patch = rng.normal(size=(n, N, D)) + centres[labels][:, None]
    prefix = rng.normal(size=(n, 1, D)) + centres[labels][:, None]
    return TokenSet(
        patch=patch.astype(np.float32),
        prefix=prefix.astype(np.float32),
        labels=labels,
        grid=(4, 4),
        origin=TokenOrigin(backbone="toy", layer=layer),
    )


class FakeCache:
    """What layer_sweep needs from a TokenCache: .layers and .tokens(layer, in_memory)."""

    def __init__(self, sets):
        self.sets, self.loaded = sets, []

    @property
    def layers(self):
        return list(self.sets)

    def tokens(self, layer, in_memory=False):
        self.loaded.append((layer, in_memory))
        return self.sets[layer]


@pytest.fixture(scope="module")
def caches():
    train = {0: make_tokens(240, 0.0, 0, 0), 3: make_tokens(240, 1.0, 1, 3)}  # block 0: noise, block 3: informative
    val = {0: make_tokens(90, 0.0, 2, 0), 3: make_tokens(90, 1.0, 3, 3)}
    return train, val


def test_layer_sweep_finds_the_informative_block(caches):
    train, val = caches
    cache = FakeCache(train)
    df = layer_sweep(cache, val, probes={"gap": {}, "ep": {"num_queries": 4}, "cls": {}}, in_memory=True, **FIT)
    assert len(df) == 2 * 3
    assert {"backbone", "layer", "probe", "seed", "best_acc", "final_acc", "params", "n_train"} <= set(df.columns)
    assert (df["backbone"] == "toy").all() and (df["seed"] == 0).all() and (df["n_train"] == 240).all()
    assert cache.loaded == [(0, True), (3, True)]  # each layer is read once for all probes
    acc = df.pivot(index="probe", columns="layer", values="best_acc")
    assert (acc[3] > 0.6).all() and (acc[0] < 0.55).all() and (acc[3] > acc[0] + 0.2).all()
    assert df.loc[df["probe"] == "ep", "params"].iloc[0] == 4 * D + D * D + D * C + C


def test_layer_sweep_options(caches):
    train, val = caches
    df = layer_sweep(
        train,
        val,
        probes={"ep_d2": {"name": "ep", "num_queries": 2, "d_out": 2}},
        layers=[3],
        seeds=(0, 1),
        context={"backbone": "other"},
        **FIT,
    )
    assert df["probe"].tolist() == ["ep_d2", "ep_d2"] and df["seed"].tolist() == [0, 1] and (df["layer"] == 3).all()
    assert (df["backbone"] == "other").all()
    assert df["params"].iloc[0] == 2 * D + D * (D // 2) + (D // 2) * C + C
    with pytest.raises(ValueError, match=r"layers \[5\] are not in the training cache"):
        layer_sweep(train, val, probes=("gap",), layers=[5], **FIT)
    with pytest.raises(ValueError, match="unknown probe"):
        layer_sweep(train, val, probes=("gapp",), **FIT)


def test_sample_per_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 8)
    idx = sample_per_class(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3] and len(set(idx)) == 9
    assert np.array_equal(idx, sample_per_class(labels, 3, seed=0))
    draws = {tuple(sample_per_class(labels, 2, seed=s)) for s in range(6)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="class 1 has only 3; use shots <= 3"):
        sample_per_class(labels, 4, seed=0)


def test_low_shot_runs(caches):
    train, val = caches
    df = low_shot(train[3], val[3], shots=(1, 10), seeds=(0, 1), probes=("gap",), **FIT)
    assert len(df) == 4
    assert df["shots"].tolist() == [1, 1, 10, 10] and df["seed"].tolist() == [0, 1, 0, 1]
    assert df["n_train"].tolist() == [3, 3, 30, 30]
    assert (df["layer"] == 3).all() and (df["probe"] == "gap").all()
    summary = aggregate_runs(df)
    assert summary["shots"].tolist() == [1, 10] and summary["runs"].tolist() == [2, 2]
    ten = df[df["shots"] == 10]["best_acc"]
    assert summary["best_acc_mean"].iloc[1] == pytest.approx(ten.mean())
    assert summary["best_acc_std"].iloc[1] == pytest.approx(ten.std(ddof=1), nan_ok=True)


def test_low_shot_tunes_the_first_seed_and_reuses_its_choice(caches, monkeypatch):
    from epviz.training import tuning

    train, val = caches
    grids = []
    real = tuning.fit_grid
    monkeypatch.setattr(tuning, "fit_grid", lambda *a, **k: grids.append(k["seed"]) or real(*a, **k))
    budget = {key: v for key, v in FIT.items() if key != "lr"} | {"grid": {"lrs": (1e-3, 3e-1)}}
    df = low_shot(train[3], val[3], shots=(1, 10), seeds=(0, 1, 2), probes=("gap",), **budget)
    assert grids == [0, 0], "one grid per shots value, trained with the first seed"
    assert df["tuned"].tolist() == [True, False, False] * 2
    for _, runs in df.groupby("shots"):
        assert runs["lr"].nunique() == 1 and runs["lr"].iloc[0] in (1e-3, 3e-1), "the other seeds train at the chosen lr"
    grids.clear()
    every = low_shot(train[3], val[3], shots=(1,), seeds=(0, 1), probes=("gap",), tune_every_seed=True, **budget)
    assert grids == [0, 1] and every["tuned"].all()


def test_low_shot_checks_every_k_before_training(caches, monkeypatch):
    train, val = caches
    monkeypatch.setattr(probe_cache, "fit", lambda *a, **k: pytest.fail("trained before checking the shots"))
    with pytest.raises(ValueError, match="100 shots per class needs at least 100 training images of every class"):
        low_shot(train[3], val[3], shots=(1, 100), seeds=(0,), probes=("gap",), **FIT)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(shots=(1.5,)), r"shots\[0\] must be an integer >= 1, got 1.5"),  # was truncated to 1
        (dict(shots=(True,)), r"shots\[0\] must be an integer >= 1, got True"),
        (dict(seeds=(True,)), r"seeds\[0\] must be an integer >= 0, got True"),
        (dict(seeds=(0, 0)), "repeats a value"),
        (dict(seeds=()), "seeds must hold at least one value"),
    ],
)
def test_low_shot_refuses_bools_and_fractions_before_training(caches, arguments, message):
    train, val = caches
    with pytest.raises(ConfigError, match=message):
        low_shot(train[3], val[3], probes=("gap",), **{"shots": (1,), "seeds": (0,), **arguments}, **FIT)


def test_aggregate_runs_by_hand():
    runs = pd.DataFrame(
        dict(probe=["a", "a", "b"], layer=[1, 1, 1], seed=[0, 1, 0], best_acc=[0.5, 0.7, 0.9], final_acc=[0.4, 0.6, 0.8])
    )
    out = aggregate_runs(runs)
    assert out["probe"].tolist() == ["a", "b"]
    assert out["best_acc_mean"].tolist() == pytest.approx([0.6, 0.9])
    assert out["best_acc_std"].iloc[0] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and np.isnan(out["best_acc_std"].iloc[1])
    with pytest.raises(ValueError, match="columns"):
        aggregate_runs(runs, by=["shots"])


def test_probe_specs_resolve_names_variants_and_labels():
    specs = probe_specs(["cls", "ep16"])
    assert specs == {"cls": {"name": "cls"}, "ep16": {"name": "ep16"}}
    assert probe_specs({"ep_d4": {"name": "ep", "num_queries": 16, "d_out": 4}})["ep_d4"] == {
        "name": "ep",
        "num_queries": 16,
        "d_out": 4,
    }
    with pytest.raises(ValueError, match="unknown probe"):
        probe_specs(["ep", "epp"])


def test_train_probe_and_probe_zoo_use_the_budget_and_report_every_probe():
    train, _ = toy_tokens(120, 0)
    val, _ = toy_tokens(60, 1)
    result = train_probe("ep", train, val, budget=Setting.fast().fit_options(epochs=3, batch_size=32), num_queries=4)
    assert result.config["optimizer"] == "adamw" and result.config["epochs"] == 3 and result.config["weight_decay"] == 1e-4
    assert result.probe.num_queries == 4 and result.probe.grid == (4, 4)
    table, fitted = probe_zoo(
        {"toy": {"train": train, "val": val, "test": val}},
        {"gap": None, "ep4": {"name": "ep", "num_queries": 4}},
        budget=Setting.fast().fit_options(epochs=3, batch_size=32),
    )
    assert list(table["probe"]) == ["gap", "ep4"] and list(table["name"]) == ["gap", "ep"]
    assert table["test_acc"].between(0, 1).all() and (table["params"] > 0).all()
    assert set(fitted) == {("toy", "gap"), ("toy", "ep4")}
    assert table["test_acc"].max() > 0.6, "class-coded tokens are learnt"


def test_probe_zoo_one_run_per_seed_and_seed_summary():
    train, _ = toy_tokens(120, 0)
    val, _ = toy_tokens(60, 1)
    splits = {"toy": {"train": train, "val": val, "test": val}}
    budget = Setting.fast().fit_options(epochs=2, batch_size=32)
    table, fitted = probe_zoo(splits, {"gap": None, "ep4": {"name": "ep", "num_queries": 4}}, budget=budget, seeds=(0, 1, 2))
    assert table[["probe", "seed"]].values.tolist() == [[p, s] for p in ("gap", "ep4") for s in (0, 1, 2)]
    assert set(fitted) == {("toy", p, s) for p in ("gap", "ep4") for s in (0, 1, 2)}
    assert (table["num_classes"] == train.num_classes).all()
    ep = table[table["probe"] == "ep4"]
    queries = [fitted["toy", "ep4", s].state_dict() for s in (0, 1)]
    assert any(not torch.equal(queries[0][k], queries[1][k]) for k in queries[0]), "the seeds give different runs"
    # seed 1 of a three-seed zoo is the run of a one-seed zoo with seed=1
    single, single_fitted = probe_zoo(splits, {"ep4": {"name": "ep", "num_queries": 4}}, budget=budget, seed=1)
    assert set(single_fitted) == {("toy", "ep4")} and single["seed"].tolist() == [1]
    assert single["test_acc"].iloc[0] == pytest.approx(ep.loc[ep["seed"] == 1, "test_acc"].iloc[0])
    same = single_fitted["toy", "ep4"].state_dict()
    assert all(torch.equal(same[k], fitted["toy", "ep4", 1].state_dict()[k]) for k in same)
    summary = seed_summary(table)
    assert summary["probe"].tolist() == ["gap", "ep4"] and (summary["seeds"] == 3).all()
    np.testing.assert_allclose(summary["test_acc"], table.groupby("probe", sort=False)["test_acc"].mean())
    np.testing.assert_allclose(summary["test_acc_std"], table.groupby("probe", sort=False)["test_acc"].std(ddof=1))
    assert {"params", "name", "layer", "num_classes", "val_acc_std"} <= set(summary.columns)
    assert "seed" not in summary.columns and "seconds" not in summary.columns
    # every run has the bootstrap interval of its test top-1 around it; the summary keeps it for single runs only
    assert (table["test_acc_lo"] <= table["test_acc"]).all() and (table["test_acc"] <= table["test_acc_hi"]).all()
    width, imperfect = table["test_acc_hi"] - table["test_acc_lo"], table["test_acc"].between(0.01, 0.99)
    assert imperfect.any() and (width[imperfect] > 0.02).all() and (width <= 0.5).all(), "60 test images: a wide interval"
    assert summary[["test_acc_lo", "test_acc_hi"]].isna().all().all()
    # the expected calibration error of the same predictions, with its interval from the same resamples
    assert table["ece"].between(0, 1).all() and (table["ece_lo"] <= table["ece_hi"]).all()
    assert (table["ece_hi"] > table["ece_lo"]).any() and "ece_std" in summary.columns
    # k-NN reads the backbone's tokens with nothing trained: one value per backbone, in every row
    assert table["knn_cls"].nunique() == 1 and table["knn_gap"].between(0, 1).all()
    assert table["knn_gap"].iloc[0] == knn_predict(train, val, feature="gap").hits().mean()
    out = predict(fitted["toy", "gap", 0], val)
    scores = held_out_scores(fitted["toy", "gap", 0], val)
    assert scores["ece"] == pytest.approx(out.reliability()["gap"].sum())
    assert scores["test_acc"] == table.loc[(table["probe"] == "gap") & (table["seed"] == 0), "test_acc"].iloc[0]
    one = seed_summary(single)
    assert (
        one["test_acc_lo"].iloc[0] == single["test_acc_lo"].iloc[0]
        and one["test_acc_hi"].iloc[0] == single["test_acc_hi"].iloc[0]
    )
    with pytest.raises(ValueError, match="distinct"):
        probe_zoo(splits, ["gap"], budget=budget, seeds=(0, 0))


def test_probe_zoo_reseeds_at_the_chosen_configuration_without_a_grid():
    train, _ = toy_tokens(120, 0)
    val, _ = toy_tokens(60, 1)
    splits = {"toy": {"train": train, "val": val, "test": val}}
    budget = Setting.fast().fit_options(epochs=2, batch_size=32)
    assert "grid" in budget
    specs = {"gap": None, "ep4": {"name": "ep", "num_queries": 4}}
    tuned, _ = probe_zoo(splits, specs, budget=budget)
    assert tuned["tuned"].all()
    chosen = tuned.assign(lr=[3e-3, 2e-2], weight_decay=[1e-4, 5e-2])  # stand-ins for the grid's choices
    again, fitted = probe_zoo(splits, dict(reversed(specs.items())), budget=budget, seeds=(1, 2), chosen=chosen)
    assert not again["tuned"].any(), "the chosen configuration is refit, not tuned again"
    assert again.set_index(["probe", "seed"])["lr"].to_dict() == {
        ("ep4", 1): 2e-2,
        ("ep4", 2): 2e-2,
        ("gap", 1): 3e-3,
        ("gap", 2): 3e-3,
    }
    assert (again.loc[again["probe"] == "ep4", "weight_decay"] == 5e-2).all()
    assert set(fitted) == {("toy", p, s) for p in ("gap", "ep4") for s in (1, 2)}
    with pytest.raises(ValueError, match="no chosen configuration for probe 'cls'"):
        probe_zoo(splits, ["cls"], budget=budget, chosen=chosen)
    with pytest.raises(ValueError, match="missing"):
        probe_zoo(splits, ["gap"], budget=budget, chosen=chosen.drop(columns="weight_decay"))
    with pytest.raises(ValueError, match="2 chosen configurations"):
        probe_zoo(splits, ["gap"], budget=budget, chosen=pd.concat([chosen, chosen.assign(lr=1.0)]))


def test_seed_summary_by_hand_keeps_constant_columns():
    runs = pd.DataFrame(
        dict(
            backbone=["a", "a", "a", "b"],
            probe=["ep", "ep", "cls", "ep"],
            seed=[0, 1, 0, 0],
            params=[5, 5, 2, 5],
            best_epoch=[3, 4, 2, 1],
            val_acc=[0.5, 0.7, 0.4, 0.9],
            test_acc=[0.4, 0.6, 0.3, 0.8],
        )
    )
    out = seed_summary(runs)
    assert out[["backbone", "probe"]].values.tolist() == [["a", "ep"], ["a", "cls"], ["b", "ep"]]
    assert out["test_acc"].tolist() == pytest.approx([0.5, 0.3, 0.8])
    assert out["test_acc_std"].iloc[0] == pytest.approx(np.std([0.4, 0.6], ddof=1)) and out["test_acc_std"].iloc[1:].isna().all()
    assert out["seeds"].tolist() == [2, 1, 1] and out["params"].tolist() == [5, 2, 5]
    assert "best_epoch" not in out.columns, "not constant over seeds"
    with pytest.raises(ValueError, match="columns"):
        seed_summary(runs.drop(columns="test_acc"))
