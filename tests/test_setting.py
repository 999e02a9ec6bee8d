"""The notebooks' standard setting."""

import numpy as np
import pytest

from epviz.errors import ConfigError
from epviz.setting import BUDGET_KEYS, PRESETS, THRESHOLDS, Setting
from epviz.training import fit


def test_full_and_fast_budgets_and_sizes():
    full, fast = Setting.full(), Setting.fast()
    assert dict(full.sizes) == {"train": 20_000, "val": 2_000, "test": 4_000}
    assert all(fast.sizes[s] < full.sizes[s] for s in ("train", "val", "test"))
    assert full.budget["epochs"] == 15 and full.budget["precision"] == "auto" and full.budget["batch_size"] == 256
    assert fast.budget["epochs"] < full.budget["epochs"] and fast.budget["precision"] == "fp32"
    assert full.fit_options(lr=0.5)["lr"] == 0.5 and full.budget["lr"] == 1e-3
    assert full.budget["optimizer"] == "adamw" and full.budget["weight_decay"] == 1e-4
    assert full.low_shot_budget["epochs"] == 100 and fast.low_shot_budget["epochs"] == 40


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
    with pytest.raises(ValueError, match=r"sizes\['train'\].* must be an integer >= 1, got 0"):
        Setting.full().replace(sizes={"train": 0})
    with pytest.raises(TypeError):
        Setting.full().budget["lr"] = 1.0  # read-only


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([1e-3, 1e-2], "grid must be a mapping"),
        ({"lrs": ()}, r"lrs must hold at least one value, e.g. lrs=\(1e-3, 3e-3, 1e-2\)"),
        ({"lrs": ("fast",)}, r"lrs\[0\] must be a finite number > 0, got 'fast'"),
        ({"lrs": "1e-3"}, "lrs must be a sequence"),
        ({"lrs": (1e-3, -1e-2)}, r"lrs\[1\] must be a finite number > 0, got -0.01"),
        ({"lrs": (True,)}, r"lrs\[0\] must be a finite number > 0, got True"),
        ({"lrs": (1e-3,), "weight_decays": (float("nan"),)}, r"weight_decays\[0\] must be a finite number >= 0"),
        ({"lrs": (1e-3,), "weight_decays": (False,)}, r"weight_decays\[0\] must be a finite number >= 0, got False"),
        ({"lrs": (1e-3, 1e-3)}, "repeats a value"),
        ({"lrs": (1e-3,), "train_size": 1000.5}, "grid train_size .* must be an integer >= 2, got 1000.5"),
        ({"lrs": (1e-3,), "train_size": True}, "grid train_size .* must be an integer >= 2, got True"),
    ],
)
def test_a_bad_grid_is_refused_with_its_fix(grid, message):
    with pytest.raises(ConfigError, match=message):
        Setting.full().replace(grid=grid)
    with pytest.raises(ConfigError, match=message):
        Setting(grid=grid)


@pytest.mark.parametrize("size", [1000.5, True, 0, -3, float("nan"), float("inf"), "1000"])
def test_a_split_size_must_be_a_whole_number_of_images(size):
    # 1000.5 was truncated to 1000 and True taken for 1 image
    with pytest.raises(ConfigError, match=r"sizes\['train'\] \(images; None: the whole split\) must be an integer >= 1"):
        Setting.full().replace(sizes={"train": size})


@pytest.mark.parametrize("step", [1.5, True, 0])
def test_the_threshold_step_must_be_a_whole_number(step):
    with pytest.raises(ConfigError, match="threshold_step must be an integer >= 1"):
        Setting.full().replace(threshold_step=step)


def test_whole_sizes_are_kept_as_integers():
    setting = Setting.full().replace(sizes={"train": 1000.0, "val": np.int64(10), "test": None}, threshold_step=2.0)
    assert setting.sizes == {"train": 1000, "val": 10, "test": None} and type(setting.sizes["train"]) is int
    assert setting.threshold_step == 2 and len(setting.thresholds) == 50


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(sizes={"trian": 5_000}), "sizes takes one size per split .*unknown: trian"),
        (dict(budget={"epoch": 3}), r"unknown budget option\(s\) \['epoch'\]; a budget takes epochs, batch_size"),
        (dict(low_shot_budget={"learning_rate": 1e-2}), r"unknown low_shot_budget option\(s\) \['learning_rate'\]"),
    ],
)
def test_unknown_sizes_and_options_are_refused(change, message):
    # they used to be ignored: a typo'd size or option silently kept the default
    with pytest.raises(ConfigError, match=message):
        Setting.full().replace(**change)
    with pytest.raises(ConfigError, match=message):
        Setting(**{**PRESETS["full"], **change})


def test_budget_keys_are_fit_options():
    assert set(BUDGET_KEYS) <= set(fit.__kwdefaults__)


def test_the_name_says_what_the_setting_is():
    assert [s.name for s in (Setting(), Setting.full(), Setting.fast(), Setting.single_recipe(), Setting.paper())] == [
        "full",
        "full",
        "fast",
        "single-recipe",
        "paper",
    ]
    assert Setting(**PRESETS["fast"]).name == "fast" and Setting(grid=None).name == "single-recipe"
    assert Setting(sizes=PRESETS["fast"]["sizes"]).name == "custom", "fast sizes with the full budget are not 'full'"
    assert Setting.fast().replace(threshold_step=4).name == "fast", "an unchanged copy keeps its name"
    # a preset's budget on other sizes keeps its name (epviz train --setting fast --sizes train=16 ...)
    small = Setting.fast().replace(sizes={"train": 16, "val": 8, "test": 8}, name="fast")
    assert small.is_fast and small.sizes["train"] == 16
    assert Setting.full().replace(sizes={"train": None}, name="full").name == "full"
    assert Setting.fast().replace(name="smoke test").name == "smoke test"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Setting(name="fast"), "a setting named 'fast' runs the fast budget"),
        (lambda: Setting.full().replace(name="fast"), "a setting named 'fast' runs the fast budget"),
        (
            lambda: Setting.fast().replace(sizes=PRESETS["full"]["sizes"], name="fast"),
            r"named 'fast' checks the pipeline on at most",
        ),
        (lambda: Setting.fast().replace(sizes={"test": None}, name="fast"), r"got \{'test': None\}"),
        (lambda: Setting.fast().replace(name="full"), "a setting named 'full' runs the full budget"),
        (lambda: Setting.full().replace(budget={"lr": 3e-3}, name="full"), "a setting named 'full' runs the full budget"),
        (lambda: Setting.full().replace(name="paper"), "a setting named 'paper'"),
    ],
)
def test_a_contradictory_name_is_refused(build, message):
    # Setting(name="fast") was a full-size, full-budget setting that called itself fast (is_fast True)
    with pytest.raises(ConfigError, match=message):
        build()
