"""The per-predictor table: every measure for every attention predictor."""

import numpy as np
import pytest

from epviz.analysis import mean_attention_rows, predictor_table, predictor_tables
from epviz.setting import Setting
from epviz.training import probe_zoo, train_probe
from tests.toy_tokens import Boxes, toy_tokens


def test_predictor_table_has_every_measure_for_every_predictor():
    train, _ = toy_tokens(150, 0)
    test, boxes = toy_tokens(30, 2)
    probe = train_probe("ep", train, train, budget=Setting.fast().fit_options(epochs=4, batch_size=50), num_queries=4).probe
    table = predictor_table(
        probe,
        test,
        Boxes(boxes),
        context=dict(backbone="toy", layer=1, probe="ep4", seed=0),
        thresholds=Setting.fast().thresholds,
    )
    assert list(table["predictor"]) == [0, 1, 2, 3]
    for column in ("delta_acc", "maxboxacc_v2", "inbox_mass", "chance_mass", "pointing", "entropy", "entropy_norm"):
        assert table[column].notna().all(), column
    assert table["entropy_norm"].between(0, 1 + 1e-9).all() and table["maxboxacc_v2"].between(0, 1).all()
    np.testing.assert_allclose(table["chance_mass"], 0.25)
    np.testing.assert_allclose(table["delta_acc"], table["acc_full"] - table["acc_uniform"])
    assert (table[["backbone", "probe"]] == ["toy", "ep4"]).all().all()
    subset = predictor_table(probe, test, Boxes(boxes), index=range(10), thresholds=[0.5])
    assert (subset["n_images"] == 10).all() and (subset["n_images_localization"] == 10).all()
    cheap = predictor_table(probe, test, Boxes(boxes), localization_index=range(6), thresholds=[0.5])
    assert (cheap["n_images"] == 30).all() and (cheap["n_images_localization"] == 6).all()
    np.testing.assert_allclose(cheap["delta_acc"], table["delta_acc"])


def fitted_zoo(specs: dict) -> tuple[dict, dict, np.ndarray]:
    """The toy tokens (train doubling as val), the zoo of `specs` fitted for one epoch on them, the test boxes."""
    train, _ = toy_tokens(90, 0)
    test, boxes = toy_tokens(20, 2)
    tokens = {"toy": {"train": train, "val": train, "test": test}}
    _, fitted = probe_zoo(tokens, specs, budget=Setting.fast().fit_options(epochs=1, batch_size=30))
    return tokens, fitted, boxes


def test_predictor_tables_cover_every_attentive_probe_and_skip_the_others():
    tokens, fitted, boxes = fitted_zoo({"gap": None, "ep4": {"name": "ep", "num_queries": 4}, "mhca": None})
    table, _ = predictor_tables(fitted, tokens, Boxes(boxes), thresholds=[0.2, 0.6])
    expected = {"ep4": 4, "mhca": fitted["toy", "mhca"].num_predictors}
    assert table.groupby("probe").size().to_dict() == expected
    assert (table["layer"] == 1).all() and table["delta_acc"].notna().all()
    with pytest.raises(ValueError, match="attention predictors"):
        predictor_tables({("toy", "gap"): fitted["toy", "gap"]}, tokens, Boxes(boxes))


def test_predictor_tables_take_the_mean_map_from_the_training_split_and_keep_the_records():
    tokens, fitted, boxes = fitted_zoo({"ep4": {"name": "ep", "num_queries": 4}, "mhca": None})
    train, test = tokens["toy"]["train"], tokens["toy"]["test"]
    table, records = predictor_tables(fitted, tokens, Boxes(boxes), thresholds=[0.2, 0.6], n_boot=40)
    assert set(records) == {("toy", "ep4"), ("toy", "mhca")}
    assert table["delta_acc_mean"].notna().all() and table["delta_acc_shuffled"].notna().all()
    assert table.loc[table["probe"] == "ep4", "delta_acc_zero"].notna().all()
    assert table.loc[table["probe"] == "mhca", ["delta_acc_zero", "delta_acc_zero_lo"]].isna().all().all()
    assert records["toy", "ep4"].context["probe"] == "ep4"
    mean = mean_attention_rows(fitted["toy", "ep4"], train)
    alone = predictor_table(fitted["toy", "ep4"], test, Boxes(boxes), thresholds=[0.2, 0.6], mean_maps=mean, n_boot=0)
    np.testing.assert_allclose(alone["delta_acc_mean"], table.loc[table["probe"] == "ep4", "delta_acc_mean"])
    without, _ = predictor_tables(fitted, tokens, Boxes(boxes), thresholds=[0.5], train_split=None, n_boot=0)
    assert without["delta_acc_mean"].isna().all()
    with pytest.raises(ValueError, match="the mean map must come from other images"):
        predictor_tables(fitted, tokens, Boxes(boxes), train_split="test")
