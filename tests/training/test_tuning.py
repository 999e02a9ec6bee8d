"""Tuned runs: the grid chosen on val, refit at full size after a subset, stored in and read from the probe cache."""

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.errors import ConfigError
from epviz.setting import Setting, check_grid
from epviz.tokens import TokenOrigin, TokenSet
from epviz.training import fit, fit_grid, probe_cache
from epviz.training.tuning import tune

D, C, N = 8, 3, 4
BUDGET = dict(epochs=3, batch_size=16, warmup_epochs=1, optimizer="adamw")
GRID = {"lrs": (3e-3, 3e-2), "weight_decays": (1e-4,)}


def token_set(n=60, seed=0, cache=None) -> TokenSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    patch = rng.normal(size=(n, N, D)).astype(np.float16)
    patch[np.arange(n), rng.integers(0, N, n), labels] += 4.0
    prefix = rng.normal(size=(n, 1, D)).astype(np.float16)
    return TokenSet(patch, prefix, labels, (2, 2), num_classes=C, origin=TokenOrigin(backbone="toy", layer=0, cache=cache))


def ep(seed=0):
    return probes.build("ep", D, C, seed=seed, num_queries=4)


def test_tune_without_subset_is_the_grid_point_chosen_on_val():
    train, val = token_set(60, 0), token_set(30, 1)
    tuned = tune(ep(), train, val, grid=GRID, **BUDGET)
    grid = fit_grid(ep(), train, val, lrs=GRID["lrs"], weight_decays=GRID["weight_decays"], progress=False, **BUDGET)
    assert tuned.config["lr"] == grid.best["lr"] and tuned.best_acc == grid.best["best_val_acc"]
    assert tuned.grid_points["lr"].tolist() == list(GRID["lrs"])
    assert len(tuned.grid_history) == len(GRID["lrs"]) * BUDGET["epochs"]
    assert len(tuned.history) == BUDGET["epochs"] and tuned.best_epoch == int(grid.best["best_epoch"])
    for name, value in grid.probe.state_dict().items():
        torch.testing.assert_close(tuned.probe.state_dict()[name], value)


def test_tune_on_a_subset_refits_the_chosen_point_on_every_training_image():
    train, val = token_set(90, 0), token_set(30, 1)
    tuned = tune(ep(), train, val, grid={**GRID, "train_size": 30}, **BUDGET)
    lr, wd = tuned.config["grid"]["chosen"]["lr"], tuned.config["grid"]["chosen"]["weight_decay"]
    assert "30 of 90" in tuned.config["grid"]["selected_on"]
    refit = fit(ep(), train, val, lr=lr, weight_decay=wd, progress=False, **BUDGET)
    assert tuned.config["train_size"] == 90 and tuned.config["lr"] == lr
    np.testing.assert_allclose(tuned.history["val_acc"], refit.history["val_acc"])
    for name, value in refit.probe.state_dict().items():
        torch.testing.assert_close(tuned.probe.state_dict()[name], value)


def test_fit_or_load_tunes_with_a_grid_and_stores_the_grid_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    train, val = token_set(60, 0, cache="t"), token_set(30, 1, cache="v")
    first = probe_cache.fit_or_load(ep(), train, val, grid=GRID, **BUDGET)
    again = probe_cache.fit_or_load(ep(), train, val, grid=GRID, **BUDGET)
    assert "cached" not in first.config and again.config["cached"]
    assert again.grid_points["best_val_acc"].tolist() == first.grid_points["best_val_acc"].tolist()
    assert again.config["lr"] == first.config["lr"]
    other = probe_cache.fit_or_load(ep(), train, val, grid={**GRID, "lrs": (1e-3,)}, **BUDGET)
    assert "cached" not in other.config, "another grid is another run"


def test_grid_checks_and_setting_options():
    assert check_grid({"lrs": [1e-3]}) == {"lrs": (1e-3,), "weight_decays": (1e-4,), "train_size": None}
    with pytest.raises(ConfigError, match="unknown grid key"):
        check_grid({"lrs": [1e-3], "momentum": [0.9]})
    with pytest.raises(ConfigError, match="needs learning rates"):
        check_grid({"weight_decays": [0.0]})
    with pytest.raises(ConfigError, match="cannot be given with a grid"):
        tune(ep(), token_set(), token_set(30, 1), grid=GRID, lr=1e-3, **BUDGET)
    full = Setting.full().fit_options()
    assert "lr" not in full and "weight_decay" not in full and full["grid"]["lrs"] == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    single = Setting.single_recipe().fit_options()
    assert single["lr"] == 1e-3 and "grid" not in single
    assert Setting.full().low_shot_options()["grid"]["train_size"] is None, "low-shot sets are tuned whole"
    assert "grid" not in Setting.fast().low_shot_options() and Setting.fast().low_shot_options()["lr"] == 1e-3
    assert Setting.paper().fit_options()["optimizer"] == "lars" and Setting.paper().fit_options()["epochs"] == 90


@pytest.mark.parametrize(
    ("grid", "options", "message"),
    [
        ({"lrs": (True,)}, {}, r"lrs\[0\] must be a finite number > 0, got True"),  # trained at lr 1.0
        ({"lrs": (1e-3,), "weight_decays": (True,)}, {}, r"weight_decays\[0\] must be a finite number >= 0, got True"),
        ({"lrs": (1e-3,), "train_size": 30.5}, {}, "train_size .* must be an integer >= 2, got 30.5"),
        ({**GRID, "train_size": 30}, {"seed": True}, "seed must be an integer >= 0, got True"),
        (GRID, {"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        (GRID, {"epochs": True}, "epochs must be an integer"),
        (GRID, {"batch_size": False}, "batch_size must be an integer"),
    ],
)
def test_bools_and_fractions_are_refused_before_training(grid, options, message):
    with pytest.raises(ConfigError, match=message):
        tune(ep(), token_set(60, 0), token_set(30, 1), grid=grid, **{**BUDGET, **options})
