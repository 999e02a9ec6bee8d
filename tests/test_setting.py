"""The notebooks' standard setting."""

import numpy as np
import pytest

from epviz.errors import ConfigError
from epviz.setting import THRESHOLDS, Setting


def test_full_and_fast_budgets_and_sizes():
    full, fast = Setting.full(), Setting.fast()
    assert dict(full.sizes) == {"train": 20_000, "val": 2_000, "test": 4_000}
    assert all(fast.sizes[s] < full.sizes[s] for s in ("train", "val", "test"))
    assert full.budget["epochs"] == 15 and full.budget["precision"] == "bf16" and full.budget["batch_size"] == 256
    assert fast.budget["epochs"] < full.budget["epochs"] and fast.budget["precision"] == "fp32"
    assert full.fit_options(lr=0.5)["lr"] == 0.5 and full.budget["lr"] == 1e-3
    assert full.budget["optimizer"] == "adamw" and full.budget["weight_decay"] == 1e-4
    assert full.low_shot_budget["epochs"] == 100 and fast.low_shot_budget["epochs"] == 40


def test_from_env_switches_on_epviz_fast(monkeypatch):
    monkeypatch.setenv("EPVIZ_FAST", "1")
    assert Setting.from_env().is_fast
    monkeypatch.setenv("EPVIZ_FAST", "0")
    assert not Setting.from_env().is_fast and Setting.from_env() == Setting.full()


def test_thresholds_and_probe_set():
    np.testing.assert_array_equal(Setting.full().thresholds, THRESHOLDS)
    np.testing.assert_array_equal(Setting.fast().thresholds, THRESHOLDS[::4])
    assert Setting.fast().probe_set() == ["cls", "gap", "ep16", "mhca", "simpool", "cbam"]
    full = Setting.full().probe_set()
    assert "ep16" in full and "ep" not in full and "mhca" in full and len(full) == len(set(full))


def test_replace_makes_a_custom_setting_and_checks_its_fields():
    custom = Setting.full().replace(sizes={"test": None}, budget={"lr": 3e-3})
    assert custom.name == "custom" and custom.sizes["test"] is None and custom.sizes["train"] == 20_000
    assert custom.budget["lr"] == 3e-3 and custom.budget["epochs"] == 15
    with pytest.raises(ValueError, match="unknown setting field"):
        Setting.full().replace(epochs=3)
    with pytest.raises(ValueError, match="positive"):
        Setting.full().replace(sizes={"train": 0})
    with pytest.raises(TypeError):
        Setting.full().budget["lr"] = 1.0  # read-only


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([1e-3, 1e-2], "grid must be a mapping"),
        ({"lrs": ()}, "the grid is empty: pass at least one learning rate"),
        ({"lrs": ("fast",)}, "lrs must hold numbers.*'fast'"),
        ({"lrs": "1e-3"}, "lrs must be a sequence of numbers"),
        ({"lrs": (1e-3, -1e-2)}, r"learning rates must be positive and finite; got \[-0.01\]"),
        ({"lrs": (1e-3,), "weight_decays": (float("nan"),)}, "weight decays must be >= 0 and finite"),
        ({"lrs": (1e-3, 1e-3)}, "repeats a value"),
    ],
)
def test_a_bad_grid_is_refused_with_its_fix(grid, message):
    with pytest.raises(ConfigError, match=message):
        Setting.full().replace(grid=grid)
    with pytest.raises(ConfigError, match=message):
        Setting(grid=grid)
