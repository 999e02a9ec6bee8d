"""fit_grid(): equivalence with separate fits, selection on val, divergence, input errors, determinism."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import epviz.probes as probes
from epviz.errors import ConfigError
from epviz.evaluate import accuracy
from epviz.tokens import TokenSet
from epviz.training import GridResult, fit, fit_grid, select_point
from epviz.training.grid import DIVERGENCE_FACTOR

D, C, N = 8, 3, 4
OPTIONS = dict(epochs=3, batch_size=16, warmup_epochs=1, progress=False)
EP = dict(num_queries=4)


def token_set(n=60, seed=0) -> TokenSet:
    """Tokens whose class shows as a shifted direction on one random patch token."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, N, D)).astype(np.float16)
    patch[np.arange(n), rng.integers(0, N, n), labels] += 4.0
    prefix = rng.normal(size=(n, 1, D)).astype(np.float16)
    return TokenSet(patch, prefix, labels, (2, 2), num_classes=C)


@pytest.fixture(scope="module")
def data():
    return token_set(60, seed=0), token_set(30, seed=1)


def separate_fit(data, lr, wd, seed=0, **kwargs):
    options = {**OPTIONS, "optimizer": "adamw", **kwargs}
    probe = probes.build("ep", D, C, seed=seed, **EP)
    return fit(probe, data[0], data[1], lr=lr, weight_decay=wd, seed=seed, **options)


def assert_same_weights(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name].float(), sb[name].float(), atol=atol, rtol=0, msg=name)


HISTORY = ["train_loss", "train_acc", "val_loss", "val_acc"]


@pytest.mark.parametrize("optimizer, lrs, wds", [("adamw", (3e-3, 3e-2), (0.0, 0.05)), ("lars", (0.3, 3.0), (0.0, 0.5))])
def test_every_grid_point_reproduces_a_separate_fit(data, optimizer, lrs, wds):
    result = fit_grid("ep", *data, lrs=lrs, weight_decays=wds, optimizer=optimizer, keep_all=True, **OPTIONS, **EP)
    assert isinstance(result, GridResult)
    assert len(result.points) == 4 and len(result.history) == 4 * 3 and len(result.probes) == 4
    for point, row in result.points.iterrows():
        alone = separate_fit(data, row["lr"], row["weight_decay"], optimizer=optimizer)
        history = result.history[result.history["point"] == point]
        np.testing.assert_allclose(history[HISTORY].to_numpy(), alone.history[HISTORY].to_numpy(), atol=1e-5, rtol=0)
        assert history["epoch"].tolist() == alone.history["epoch"].tolist()
        assert row["best_epoch"] == alone.best_epoch
        assert row["best_val_acc"] == pytest.approx(alone.best_acc)
        assert row["final_val_acc"] == pytest.approx(alone.final_acc)
        assert_same_weights(result.probes[point], alone.probe)
    # the weight decays matter (so the test can tell points apart)
    a, b = result.probes[0].head.weight, result.probes[1].head.weight
    assert (a - b).abs().max() > 1e-4


def test_a_grid_of_one_point_equals_fit(data):
    result = fit_grid("ep", *data, lrs=(1e-2,), weight_decays=(1e-3,), **OPTIONS, **EP)
    alone = separate_fit(data, 1e-2, 1e-3)
    np.testing.assert_allclose(result.history[HISTORY].to_numpy(), alone.history[HISTORY].to_numpy(), atol=1e-5, rtol=0)
    assert result.best["point"] == 0 and result.best["best_epoch"] == alone.best_epoch
    assert_same_weights(result.probe, alone.probe)
    assert not result.probe.training
    assert accuracy(result.probe, data[1])["top1"] == pytest.approx(alone.best_acc)
    assert result.probes is None  # not kept unless asked for


def test_tables_and_the_selected_head(data):
    result = fit_grid("ep", *data, lrs=(1e-3, 3e-2), weight_decays=(1e-4,), keep_all=True, **OPTIONS, **EP)
    h, p = result.history, result.points
    assert list(h.columns) == ["point", "lr", "weight_decay", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert list(p.columns) == [
        "point",
        "lr",
        "weight_decay",
        "best_epoch",
        "best_val_acc",
        "final_val_acc",
        "epochs_run",
        "diverged",
    ]
    assert p["lr"].tolist() == [1e-3, 3e-2] and p["epochs_run"].tolist() == [3, 3] and not p["diverged"].any()
    best_per_point = h.groupby("point")["val_acc"].max()
    np.testing.assert_allclose(p["best_val_acc"], best_per_point)
    chosen = int(result.best["point"])
    assert chosen == int(p["best_val_acc"].idxmax())
    assert result.probe is result.probes[chosen]
    # the chosen head holds its best epoch's weights: its val accuracy is the recorded best
    assert accuracy(result.probe, data[1])["top1"] == pytest.approx(result.best["best_val_acc"])
    assert result.select_on == "val" and result.config["select_on"] == "val"
    assert result.config["lrs"] == [1e-3, 3e-2] and result.config["probe"]["name"] == "ep"
    assert result.seconds > 0


def test_selection_rule_and_tie_break():
    points = pd.DataFrame(
        dict(
            point=range(6),
            lr=[1e-2, 1e-3, 1e-3, 3e-3, 1e-4, 1e-3],
            weight_decay=[0.0, 1e-2, 1e-4, 0.0, 0.0, 1e-3],
            best_val_acc=[0.5, 0.8, 0.8, 0.8, math.nan, 0.7],
        )
    )
    assert select_point(points)["point"] == 2  # 0.8 thrice: smaller lr (1e-3 twice), then smaller weight decay
    assert select_point(points.drop(index=[1, 2]))["point"] == 3
    # a diverged point (NaN) is never chosen, even when the others are poor
    assert select_point(points.assign(best_val_acc=[0.1, math.nan, math.nan, math.nan, math.nan, math.nan]))["point"] == 0
    with pytest.raises(FloatingPointError, match="every grid point diverged"):
        select_point(points.assign(best_val_acc=math.nan))


def test_ties_in_a_real_grid_go_to_the_smaller_lr_then_weight_decay(data):
    # points so close that every head makes the same predictions: all tie on val
    lrs, wds = (1e-2, 1e-2 * (1 - 1e-6)), (1e-9, 0.0)
    result = fit_grid("ep", *data, lrs=lrs, weight_decays=wds, **OPTIONS, **EP)
    assert result.points["best_val_acc"].nunique() == 1
    assert (result.best["lr"], result.best["weight_decay"]) == (lrs[1], 0.0)
    assert result.best["point"] == 3


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_a_diverging_point_is_marked_and_the_others_go_on(data, optimizer):
    with pytest.warns(RuntimeWarning, match=r"grid point 1 \(lr 1e\+06.*diverged"):
        result = fit_grid("ep", *data, lrs=(1e-2, 1e6), optimizer=optimizer, keep_all=True, **OPTIONS, **EP)
    p = result.points.set_index("point")
    assert p["diverged"].tolist() == [False, True]
    assert math.isnan(p.loc[1, "best_val_acc"]) and math.isnan(p.loc[1, "final_val_acc"]) and pd.isna(p.loc[1, "best_epoch"])
    assert result.best["point"] == 0
    last = result.history[result.history["point"] == 1].iloc[-1]
    assert math.isnan(last["val_acc"]) and math.isnan(last["train_loss"])
    # the healthy point trained as if it were alone
    alone = fit_grid("ep", *data, lrs=(1e-2,), optimizer=optimizer, **OPTIONS, **EP)
    healthy = result.history[result.history["point"] == 0]
    np.testing.assert_allclose(healthy[HISTORY].to_numpy(), alone.history[HISTORY].to_numpy(), atol=1e-6, rtol=0)
    assert_same_weights(result.probe, alone.probe, atol=1e-6)


def test_divergence_limit_is_a_multiple_of_the_uniform_loss(data):
    # lr 1e6 with AdamW stays finite but far above 100 ln C: it counts as diverged
    with pytest.warns(RuntimeWarning, match="limit"):
        result = fit_grid("ep", *data, lrs=(1e-2, 1e6), **OPTIONS, **EP)
    assert result.points["diverged"].tolist() == [False, True]
    assert DIVERGENCE_FACTOR * math.log(C) < 1e3


def test_every_point_diverging_raises(data):
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="every grid point diverged"):
        fit_grid("ep", *data, lrs=(1e6, 1e7), **OPTIONS, **EP)


def test_early_stopping_per_head_matches_separate_fits(data):
    options = {**OPTIONS, "epochs": 6}
    result = fit_grid("ep", *data, lrs=(1e-3, 1e-1), weight_decays=(0.0,), early_stopping=1, **options, **EP)
    runs = result.points["epochs_run"]
    assert (runs < 6).all() and runs.nunique() == 2  # both heads stop early, at different epochs
    for point, row in result.points.iterrows():
        alone = separate_fit(data, row["lr"], 0.0, early_stopping=1, epochs=6)
        assert row["epochs_run"] == len(alone.history)
        assert row["best_epoch"] == alone.best_epoch
        assert len(result.history[result.history["point"] == point]) == len(alone.history)


def test_runs_are_deterministic_for_a_seed(data):
    kwargs = dict(lrs=(3e-3, 3e-2), weight_decays=(1e-4,), **OPTIONS, **EP)
    a = fit_grid("ep", *data, seed=3, **kwargs)
    b = fit_grid("ep", *data, seed=3, **kwargs)
    c = fit_grid("ep", *data, seed=4, **kwargs)
    pd.testing.assert_frame_equal(a.history, b.history)
    pd.testing.assert_frame_equal(a.points, b.points)
    assert_same_weights(a.probe, b.probe, atol=0)
    assert not np.allclose(a.history["train_loss"], c.history["train_loss"])


def test_probe_given_as_an_instance_or_a_factory(data):
    template = probes.build("ep", D, C, seed=0, **EP)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    by_name = fit_grid("ep", *data, lrs=(1e-2,), **OPTIONS, **EP)
    by_instance = fit_grid(template, *data, lrs=(1e-2,), **OPTIONS)
    by_factory = fit_grid(lambda: probes.build("ep", D, C, seed=0, **EP), *data, lrs=(1e-2,), **OPTIONS)
    pd.testing.assert_frame_equal(by_name.history, by_instance.history)
    pd.testing.assert_frame_equal(by_name.history, by_factory.history)
    for k, v in template.state_dict().items():  # the template itself is not trained
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="only when the probe is given by name"):
        fit_grid(template, *data, lrs=(1e-2,), num_queries=2, **OPTIONS)
    with pytest.raises(TypeError, match="must return a Probe"):
        fit_grid(lambda: "ep", *data, lrs=(1e-2,), **OPTIONS)


def test_bf16_grid_trains(data):
    result = fit_grid("ep", *data, lrs=(1e-2, 3e-2), precision="bf16", **OPTIONS, **EP)
    assert np.isfinite(result.history["train_loss"]).all()
    assert result.config["precision"] == "bf16"


class TestErrors:
    def grid(self, data, **kwargs):
        options = {"lrs": (1e-2,), **OPTIONS, **EP, **kwargs}
        return fit_grid("ep", *data, **options)

    def test_empty_grids(self, data):
        with pytest.raises(ConfigError, match="lrs must hold at least one value"):
            self.grid(data, lrs=())
        with pytest.raises(ConfigError, match="weight_decays must hold at least one value"):
            self.grid(data, weight_decays=[])

    @pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan, math.inf, True, "1e-2", None])
    def test_bad_learning_rates(self, data, lr):
        # lrs=(True,) trained at lr 1.0: a bool is not a learning rate
        with pytest.raises(ConfigError, match=rf"lrs\[1\] must be a finite number > 0, got {re.escape(repr(lr))}"):
            self.grid(data, lrs=(1e-2, lr))

    @pytest.mark.parametrize("wd", [-1e-4, math.nan, False, True])
    def test_bad_weight_decays(self, data, wd):
        with pytest.raises(ConfigError, match=rf"weight_decays\[1\] must be a finite number >= 0, got {re.escape(repr(wd))}"):
            self.grid(data, weight_decays=(0.0, wd))

    @pytest.mark.parametrize(
        ("option", "value"),
        [("epochs", True), ("batch_size", True), ("batch_size", 16.5), ("seed", True), ("seed", -1), ("seed", 0.5),
         ("warmup_epochs", True), ("early_stopping", True), ("label_smoothing", False)],
    )  # fmt: skip
    def test_bools_and_fractions_are_not_counts(self, data, option, value):
        with pytest.raises(ConfigError, match=f"{option}.* must be"):
            self.grid(data, **{option: value})

    def test_repeated_values_and_single_numbers(self, data):
        with pytest.raises(ConfigError, match="repeats a value"):
            self.grid(data, lrs=(1e-2, 1e-2))
        with pytest.raises(ConfigError, match=r"lrs=\(0.01,\)"):
            self.grid(data, lrs=0.01)
        with pytest.raises(ValueError, match="pass lrs=.*instead of lr"):
            self.grid(data, lr=1e-2)

    def test_validation_is_required(self, data):
        with pytest.raises(ValueError, match="never the test split"):
            fit_grid("ep", data[0], None, lrs=(1e-2,), **OPTIONS, **EP)

    def test_bad_fit_options(self, data):
        with pytest.raises(ValueError, match="optimizer must be one of"):
            self.grid(data, optimizer="rmsprop")
        with pytest.raises(ValueError, match="precision must be one of"):
            self.grid(data, precision="fp8")

    def test_tokens_that_do_not_fit(self, data):
        train, val = data
        with pytest.raises(ValueError, match="expects tokens of width D=16"):
            fit_grid(probes.build("ep", 16, C, num_queries=4), train, val, lrs=(1e-2,), **OPTIONS)
        wide = TokenSet(val.patch, val.prefix, np.full(len(val), C + 2), val.grid, num_classes=C + 3)
        with pytest.raises(ValueError, match=r"validation labels range.*num_classes=3"):
            fit_grid(probes.build("ep", D, C, **EP), train, wide, lrs=(1e-2,), **OPTIONS)

    def test_nan_tokens_name_the_sample(self, data):
        train, val = data
        patch = train.patch.copy()
        patch[7, 1, 2] = np.nan
        bad = TokenSet(patch, train.prefix, train.labels, train.grid, num_classes=C)
        with pytest.raises(ValueError, match="sample 7"):
            fit_grid("ep", bad, val, lrs=(1e-2, 1e-3), **OPTIONS, **EP)
