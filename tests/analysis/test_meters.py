"""Meters: the registry, and one pass that feeds many meters with the results of the single measures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import epviz.probes as probes
from epviz.analysis import (
    Entropy,
    Localization,
    Meter,
    UniformAblation,
    column_label,
    entropy,
    localization,
    measure,
    meter_class,
    meter_names,
    predictor_table,
    register_meter,
    table_columns,
    uniform_ablation,
    unregister_meter,
)
from epviz.tokens import TokenOrigin, TokenSet
from tests.toy_tokens import Boxes, record_calls, toy_tokens


@pytest.fixture(scope="module")
def setup():
    train, _ = toy_tokens(40, 1)
    tokens, boxes = toy_tokens(30, 2)
    probe = probes.build("ep", 32, 3, num_queries=4, seed=0, grid=(4, 4))
    with torch.no_grad():
        probe.queries.mul_(60)
        probe.train()
        probe(torch.from_numpy(train.patch), torch.from_numpy(train.prefix))  # BatchNorm statistics
    return probe.eval(), tokens, Boxes(boxes)


class Recorder(Meter):
    """Records what it is fed: batch positions, map shapes, whether the maps came."""

    columns = {"seen": "images seen"}

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.maps: list[torch.Tensor | None] = []

    def start(self, probe, tokens, dataset=None) -> None:
        self.k, self.labels = probe.num_predictors, tokens.labels

    def update(self, maps, batch) -> None:
        assert len(batch) == len(batch.labels) == len(batch.patch)
        np.testing.assert_array_equal(batch.labels.numpy(), self.labels[batch.index])
        self.batches.append(batch.index.copy())
        self.maps.append(maps)

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"predictor": range(self.k), "seen": sum(len(b) for b in self.batches)})


class Other(Recorder):
    columns = {"seen_other": "images seen"}

    def summary(self) -> pd.DataFrame:
        return super().summary().rename(columns={"seen": "seen_other"})


class LocRecorder(Recorder):
    subset = "localization_index"
    columns = {"seen_loc": "images seen"}

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"predictor": range(self.k), "seen_loc": sum(len(b) for b in self.batches)})


class NoMaps(Recorder):
    needs_maps = False
    columns = {"seen_nomaps": "images seen"}

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"predictor": range(self.k), "seen_nomaps": 0})


# --- the registry --------------------------------------------------------------------------

BUILT_IN = ["uniform_ablation", "localization", "entropy", "mean_map_ablation", "shuffled_ablation", "zero_ablation"]


TABLE_COLUMNS = (
    "predictor",
    "delta_acc",
    "delta_acc_mean",
    "delta_acc_shuffled",
    "delta_acc_zero",
    "entropy_norm",
    "box_lift",
    "maxboxacc_v2",
    "inbox_mass",
    "pointing",
)


def test_built_in_meters_in_table_order():
    assert meter_names() == BUILT_IN
    assert meter_class("localization") is Localization and meter_class("entropy") is Entropy
    assert table_columns() == TABLE_COLUMNS
    assert column_label("maxboxacc_v2") == "MaxBoxAccV2 (localization)" and column_label("nope") is None


def test_register_and_unregister():
    @register_meter("recorder_test")
    class Registered(Recorder):
        table_columns = ("seen",)

    try:
        assert Registered.name == "recorder_test" and meter_names()[-1] == "recorder_test"
        assert table_columns()[-1] == "seen" and column_label("seen") == "images seen"
        with pytest.raises(ValueError, match="already registered"):
            register_meter("recorder_test")(Recorder)
    finally:
        unregister_meter("recorder_test")
    assert "recorder_test" not in meter_names() and "seen" not in table_columns()
    with pytest.raises(KeyError, match="no meter named 'recorder_test'"):
        unregister_meter("recorder_test")
    with pytest.raises(KeyError, match="registered: "):
        meter_class("recorder_test")


def test_registration_checks_the_class():
    with pytest.raises(TypeError, match="Meter subclasses"):
        register_meter("not_a_meter")(dict)

    class Unlabelled(Recorder):
        table_columns = ("other",)

    with pytest.raises(ValueError, match=r"table_columns \['other'\] are not in its columns"):
        register_meter("unlabelled")(Unlabelled)

    class Elsewhere(Recorder):
        subset = "train"

    with pytest.raises(ValueError, match="subset must be one of"):
        register_meter("elsewhere")(Elsewhere)
    assert meter_names() == BUILT_IN


# --- one pass ------------------------------------------------------------------------------


def test_one_pass_computes_the_maps_once_per_batch_and_feeds_every_meter(setup, monkeypatch):
    probe, tokens, boxes = setup
    calls = {"attention": 0, "ablated": 0}
    attention, ablated = probe.attention, probe.ablated_logits

    def counted_attention(*args, **kwargs):
        calls["attention"] += 1
        return attention(*args, **kwargs)

    def counted_ablated(*args, **kwargs):
        calls["ablated"] += 1
        return ablated(*args, **kwargs)

    monkeypatch.setattr(probe, "attention", counted_attention)
    monkeypatch.setattr(probe, "ablated_logits", counted_ablated)
    a, b = Recorder(), Other()
    table = measure(
        probe, tokens, boxes, [UniformAblation(), a, Localization(thresholds=[0.5]), Entropy(), NoMaps(), b], batch_size=8
    )
    assert calls == {"attention": 4, "ablated": 4}  # 30 images in batches of 8: each computed once per batch
    for rec in (a, b):
        assert [len(x) for x in rec.batches] == [8, 8, 8, 6]
        np.testing.assert_array_equal(np.concatenate(rec.batches), np.arange(30))
        assert all(m.shape == (len(x), 4, 16) and m.dtype == torch.float32 for m, x in zip(rec.maps, rec.batches))
        assert a.maps[0] is b.maps[0]  # the same maps for every meter
    assert len(table) == 4 and (table["seen"] == 30).all() and (table["seen_other"] == 30).all()
    assert table["delta_acc"].notna().all() and table["maxboxacc_v2"].notna().all() and table["entropy"].notna().all()


def test_the_same_column_from_two_meters_is_refused(setup):
    probe, tokens, _ = setup
    with pytest.raises(ValueError, match=r"meters 'Recorder' and 'Recorder' both report the columns \['seen'\]"):
        measure(probe, tokens, meters=[Recorder(), Recorder()])


def test_maps_are_skipped_when_no_meter_needs_them(setup, monkeypatch):
    probe, tokens, _ = setup

    def refuse(*args, **kwargs):
        raise AssertionError("the maps were computed")

    monkeypatch.setattr(probe, "attention", refuse)
    meter = NoMaps()
    measure(probe, tokens, meters=[meter, "uniform_ablation"], batch_size=16)
    assert meter.maps == [None, None]


def test_results_equal_the_single_measure_functions(setup):
    probe, tokens, boxes = setup
    ctx = dict(seed=4)
    both = measure(probe, tokens, boxes, ["uniform_ablation", Localization(thresholds=[0.2, 0.6]), "entropy"], context=ctx)
    ablation = uniform_ablation(probe, tokens, context=ctx)
    loc = localization(probe, tokens, boxes, thresholds=[0.2, 0.6], context=ctx)
    ent = entropy(probe, tokens, context=ctx)
    for single in (ablation, loc, ent):
        columns = [c for c in single.columns if c != "n_images"]
        pd.testing.assert_frame_equal(both[columns], single[columns])
    assert (both["n_images"] == 30).all() and (both["n_images_localization"] == 30).all()
    assert "n_images_entropy" not in both  # entropy ran on the same images as the ablation
    assert list(both.columns[:5]) == ["backbone", "layer", "probe", "seed", "predictor"]
    assert both["delta_acc"].abs().max() > 0 and both["maxboxacc_v2"].max() > 0


def test_predictor_table_is_one_pass_over_every_registered_meter(setup):
    probe, tokens, boxes = setup
    table = predictor_table(probe, tokens, boxes, thresholds=[0.5], n_boot=20)
    ref = measure(
        probe,
        tokens,
        boxes,
        [
            "uniform_ablation",
            Localization(thresholds=[0.5]),
            "entropy",
            "mean_map_ablation",
            "shuffled_ablation",
            "zero_ablation",
        ],
    )
    intervals = [c for c in table.columns if c.endswith(("_lo", "_hi"))]
    assert list(table.columns[-len(intervals) :]) == intervals and "delta_acc_lo" in intervals
    pd.testing.assert_frame_equal(table.drop(columns=["predictors", *intervals]), ref)
    assert (table["predictors"] == 4).all()
    assert table["delta_acc_mean"].isna().all()  # no training tokens given: no mean map
    assert list(table.columns[5:9]) == ["acc_full", "acc_uniform", "delta_acc", "n_images"]
    assert table.columns.get_loc("maxboxacc_v2") < table.columns.get_loc("entropy")


def test_localization_index_feeds_only_the_costly_meters(setup, monkeypatch):
    probe, tokens, boxes = setup
    read = record_calls(monkeypatch, probe, "attention")
    main, loc = Recorder(), LocRecorder()
    index, loc_index = [3, 4, 5, 4], [5, 4, 4, 4, 20]
    table = measure(probe, tokens, boxes, [main, loc], index=index, localization_index=loc_index, batch_size=3)
    assert sorted(np.concatenate(main.batches).tolist()) == sorted(index)
    assert sorted(np.concatenate(loc.batches).tolist()) == sorted(loc_index)
    assert (table["seen"] == 4).all() and (table["seen_loc"] == 5).all()
    # an image in both subsets is read once: 4 index entries + the 4 and 20 only the localization has
    assert sum(read) == 6
    monkeypatch.undo()

    cheap = predictor_table(probe, tokens, boxes, localization_index=range(6), thresholds=[0.5])
    ref = localization(probe, tokens, boxes, index=range(6), thresholds=[0.5])
    assert (cheap["n_images"] == 30).all() and (cheap["n_images_localization"] == 6).all()
    np.testing.assert_allclose(cheap["maxboxacc_v2"], ref["maxboxacc_v2"])
    np.testing.assert_allclose(cheap["inbox_mass"], ref["inbox_mass"], rtol=1e-12)


def test_an_empty_localization_subset_is_reported(setup):
    probe, tokens, boxes = setup
    with pytest.raises(ValueError, match="no images were added"):
        measure(probe, tokens, boxes, [Localization(thresholds=[0.5])], localization_index=[])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(meters=[]), "got no meters"),
        (dict(meters=["nope"]), "no meter named 'nope'"),
        (dict(meters=["entropy"], precision="fp16"), "precision must be one of"),
        (dict(meters=["entropy"], index=[0, 30]), r"index must lie in \[0, 30\)"),
        (dict(meters=["entropy"], batch_size=0), "batch_size must be an integer >= 1"),
        (dict(meters=["localization"]), "needs GT boxes: pass the images' dataset"),
    ],
)
def test_bad_input(setup, kwargs, message):
    probe, tokens, _ = setup
    with pytest.raises((ValueError, KeyError), match=message):
        measure(probe, tokens, **kwargs)


def test_probe_without_predictors(setup):
    _, tokens, boxes = setup
    with pytest.raises(ValueError, match="no attention predictors"):
        measure(probes.build("gap", 32, 3), tokens, boxes)


def test_boxes_of_a_batch(setup):
    probe, tokens, boxes = setup

    class BoxReader(Recorder):
        def update(self, maps, batch) -> None:
            for i, b in zip(batch.index, batch.boxes()):
                np.testing.assert_array_equal(b, boxes.boxes[i])
            super().update(maps, batch)

    reader = BoxReader()
    measure(probe, tokens, boxes, [reader], index=[7, 2])
    assert [b.tolist() for b in reader.batches] == [[7, 2]]
    with pytest.raises(ValueError, match="needs GT boxes"):
        measure(probe, tokens, None, [BoxReader()])


def test_tokens_without_origin_keep_empty_context(setup):
    probe, tokens, _ = setup
    plain = TokenSet(patch=tokens.patch, prefix=None, labels=tokens.labels, grid=tokens.grid, origin=TokenOrigin())
    table = measure(probe, plain, meters=["entropy"])
    assert table["backbone"].isna().all() and (table["probe"] == "ep").all()
