"""The Explorer without a browser: widget values set from code, the state it then shows."""

from __future__ import annotations

import io

import numpy as np
import pytest

from epviz.explorer import ALL_CLASSES, Explorer, Selection, state_png, table_columns
from epviz.setting import Setting

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def explorer(tmp_path_factory, canvas_sets, test_vit_backbone):
    """An Explorer over timm's test_vit and tiny-random, small sets, a 2-epoch budget, a private cache."""

    sets = canvas_sets(96, 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPVIZ_CACHE", str(tmp_path_factory.mktemp("explorer-cache")))
        yield Explorer(
            [test_vit_backbone, "tiny-random"],
            ["cls", "ep", "mhca"],
            setting=Setting.fast(),
            sets=sets,
            fit_options={"epochs": 2},
        )


@pytest.fixture
def start(explorer):
    """The explorer back at its first settings (its caches kept)."""
    explorer.set(
        backbone="test_vit",
        layer=-1,
        probe="ep",
        queries=16,
        view="one query",
        query=0,
        groups=4,
        order="index",
        label=ALL_CLASSES,
        position=0,
        opacity=0.6,
        evidence="predicted",
        image="",
    )
    assert explorer.state.error == ""
    return explorer


def test_first_state_shows_image_map_labels_and_table(start, small_canvases):
    state = start.state
    assert state.image_index == 0 and state.image.shape == (64, 64, 3) and state.image.dtype == np.uint8
    np.testing.assert_array_equal(state.image, small_canvases.images[0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(state.boxes, small_canvases.boxes[:1].numpy())
    assert state.true_label == small_canvases.classes[int(small_canvases.labels[0])]
    assert state.predicted_label in small_canvases.classes and 0.1 <= state.confidence <= 1
    assert state.maps.shape == (1, 100)  # one query, the 10x10 grid of test_vit
    np.testing.assert_allclose(state.maps.sum(-1), 1, atol=1e-4)
    assert state.overlay.shape == (64, 64, 4) and np.allclose(state.overlay[..., 3], 0.6)
    assert list(state.table.columns) == [*table_columns(), "highlighted"] and len(state.table) == 16
    assert state.table["highlighted"].tolist() == [True] + [False] * 15
    assert state.table["delta_acc"].between(-1, 1).all() and state.table["entropy_norm"].between(0, 1 + 1e-6).all()
    assert state.true_label in start.widgets["labels"].value and start.widgets["error"].value == ""
    assert start.widgets["figure"].value[:4] == b"\x89PNG"
    assert "Δacc" in start.widgets["table"].value


def test_query_change_shows_that_query_without_retraining(start):
    before = dict(start.model.counts)
    first = start.state.maps.copy()
    start.widgets["query"].value = 5
    state = start.state
    assert state.selection.query == 5 and state.highlighted == [5]
    assert not np.allclose(state.maps, first)
    assert state.table.loc[state.table["highlighted"], "predictor"].tolist() == [5]
    assert start.model.counts == before


def test_all_queries_and_query_groups(start):
    state = start.set(view="all queries", opacity=0.8)
    assert state.maps.shape == (16, 100) and state.highlighted == list(range(16))
    assert state.overlay[..., 3].max() <= 0.8 + 1e-6
    state = start.set(view="query groups", groups=3, query=4)
    assert state.groups.shape == (16,) and set(state.groups.tolist()) == {0, 1, 2}
    assert state.maps.shape == (3, 100)
    np.testing.assert_allclose(state.maps.sum(-1), np.bincount(state.groups), rtol=1e-4)
    assert state.highlighted == np.flatnonzero(state.groups == state.groups[4]).tolist()
    assert state.table["group"].tolist() == state.groups.tolist()
    assert start.widgets["groups"].max == 16 and not start.widgets["groups"].disabled


def test_image_orders_and_class_filter(start, small_canvases):
    data = start.model.probe_data(start.selection)
    state = start.set(order="most confident mistakes")
    shown = [start.set(position=p) for p in range(min(3, state.image_count))]
    assert all(not s.correct for s in shown)
    assert [s.confidence for s in shown] == sorted((s.confidence for s in shown), reverse=True)
    assert state.image_count == int((data.preds != data.labels).sum())
    state = start.set(order="index", label="Bag")
    assert start.widgets["position"].value == 0  # a new ordering starts at its first image
    assert state.true_label == "Bag" and state.image_count == int((small_canvases.labels == 8).sum())
    state = start.set(label=ALL_CLASSES, order="largest Δacc", query=2)
    effect = start.model.uniform_effect(start.selection, data, [2])
    second = start.set(position=1)
    assert effect[state.image_index] >= effect[second.image_index]
    assert effect[state.image_index] == effect.max()


def test_probe_without_attention_shows_the_error_and_the_image(start):
    state = start.set(probe="cls")
    assert "cls has no attention predictors" in state.error and "image only" in state.error
    assert "no attention predictors" in start.widgets["error"].value
    assert state.true_label is not None and state.maps is None and state.table is None
    assert state.num_predictors == 0 and start.widgets["query"].disabled
    state = start.set(view="image only")
    assert state.error == "" and start.widgets["error"].value == ""
    assert state.overlay is None and state.table is None and state.accuracy is not None


def test_the_probe_panel_says_what_a_confidence_means(start):
    state = start.set(position=3)
    probs = start.model.probe_data(state.selection).probs
    data = start.model.probe_data(state.selection)
    confident = probs.max(1)
    same_bin = np.minimum((confident * 15).astype(int), 14) == min(int(state.confidence * 15), 14)
    assert state.bin_accuracy == pytest.approx((probs.argmax(1) == data.labels)[same_bin].mean())
    assert 0 <= state.calibration_error <= 1 and "calibration error (ECE)" in start.widgets["labels"].value
    from epviz.evaluate import knn_predict

    sets = start.model.tokens("test_vit", -1)
    expected = knn_predict(sets["train"], sets["test"], feature="gap").preds[state.image_index]
    assert state.knn_labels["gap"] == start.model.class_names[expected] and set(state.knn_labels) == {"cls", "gap"}
    assert "k-NN on GAP" in start.widgets["labels"].value


def test_evidence_view_shows_each_tokens_exact_share_of_the_chosen_logit(start):
    import torch

    state = start.set(view="evidence", position=2)
    assert state.error == "" and state.maps.shape == (16, 100) and state.overlay.shape == (*state.image.shape[:2], 4)
    probe = start.model.probe_data(state.selection).probe
    batch = start.model.tokens("test_vit", -1)["test"].batch(np.array([state.image_index]))
    with torch.no_grad():
        logits = probe.eval()(batch.patch, batch.prefix)[0]
    names = start.model.class_names
    predicted, true = names.index(state.predicted_label), names.index(state.true_label)
    assert state.evidence == pytest.approx(float(logits[predicted]), abs=1e-4), "the contributions sum to the logit"
    assert state.highlighted == list(range(16)), "the overlay sums every predictor"
    difference = start.set(evidence="predicted − true")
    assert difference.evidence == pytest.approx(float(logits[predicted] - logits[true]), abs=1e-4)
    assert (difference.evidence == 0) == (predicted == true)
    lp = start.set(probe="cls", evidence="predicted")
    assert lp.error == "" and np.abs(lp.maps).max() == 0, "LP on [CLS] takes nothing from the patch tokens"
    assert start.set(evidence="nope").error != ""


def test_your_own_image_is_read_checked_and_shown_like_a_test_image(start, tmp_path):
    import datetime

    from PIL import Image

    test_image = start.set(view="all queries", position=5)
    Image.fromarray(test_image.image).save(tmp_path / "mine.png")
    mine = start.add_image(tmp_path / "mine.png")
    assert mine.error == "" and mine.true_label is None and mine.boxes.shape == (0, 4)
    assert mine.predicted_label == test_image.predicted_label and set(mine.knn_labels) == {"cls", "gap"}
    np.testing.assert_allclose(mine.maps, test_image.maps, atol=2e-3)  # the same pixels give the same maps
    assert "your image mine.png" in start.widgets["labels"].value
    assert start.set(view="evidence").error == ""
    assert "no true class" in start.set(evidence="true").error
    start.set(evidence="predicted")
    cmyk = start.add_image(Image.fromarray(test_image.image).convert("CMYK"), name="cmyk")
    assert cmyk.error == "" and cmyk.selection.image == "cmyk", "a CMYK image is converted, as the loaders do"
    content = (tmp_path / "mine.png").read_bytes()
    upload = {"name": "upload.png", "type": "image/png", "size": len(content), "content": memoryview(content)}
    upload["last_modified"] = datetime.datetime.now(datetime.timezone.utc)
    start.widgets["upload"].value = (upload,)  # the upload widget's own event
    assert start.state.selection.image == "upload.png" and start.state.predicted_label == test_image.predicted_label
    failed = start.add_image(b"plain text, not pixels", name="not-an-image.png")
    assert "not-an-image.png" in failed.error and start.state.selection.image == "upload.png"
    assert "not a valid image" in start.set(image="nope").error, "the widget offers the added images only"
    assert "no added image named 'nope'" in start.model.state(start.state.selection.replace(image="nope")).error


def test_reselecting_a_probe_never_retrains(start):
    start.set(probe="mhca")
    trained = start.model.counts["trainings"]
    start.set(probe="ep")
    start.set(probe="mhca")
    assert start.model.counts["trainings"] == trained
    state = start.set(probe="ep", queries=8, query=7)
    assert state.num_predictors == 8 and len(state.table) == 8
    assert start.model.counts["trainings"] == trained + 1
    start.set(queries=16)
    assert start.model.counts["trainings"] == trained + 1


def test_backbone_change_extracts_once_with_progress(start):
    messages = []
    report = start.model.progress
    start.model.progress = lambda fraction, message: (messages.append((fraction, message)), report(fraction, message))
    try:
        state = start.set(backbone="tiny-random")
        extracted = start.model.counts["extractions"]
        assert state.error == "" and state.maps.shape == (1, 64)  # tiny-random: 8x8 grid
        assert any("tokens of tiny-random" in m for _, m in messages)
        assert [f for f, _ in messages] == sorted(f for f, _ in messages)
        assert start.widgets["progress"].value == 1.0
        messages.clear()
        state = start.set(layer=2)
        assert state.error == "" and start.model.counts["extractions"] == extracted
        assert not any("tokens of" in m for _, m in messages)
        assert [o[1] for o in start.widgets["layer"].options] == [-1, 0, 1, 2, 3, 4, 5]
    finally:
        start.model.progress = report


def test_bad_choices_show_their_error(start):
    start.set(backbone="vit_nonexistent")
    assert "not a valid backbone" in start.widgets["error"].value and "test_vit" in start.widgets["error"].value
    assert start.selection.backbone == "test_vit"
    start.set(colour="red")
    assert "unknown explorer setting" in start.widgets["error"].value
    model, sel = start.model, start.selection
    assert "out of range" in model.state(sel.replace(query=99)).error
    assert "between 1 and 16" in model.state(sel.replace(view="query groups", groups=17)).error
    assert "positions 0..47" in model.state(sel.replace(position=48)).error
    assert "opacity" in model.state(sel.replace(opacity=1.5)).error
    assert "layer 9 is out of range" in model.state(sel.replace(layer=9)).error
    assert "not one of this Explorer's probes" in model.state(sel.replace(probe="jepa")).error
    state = start.set(view="one query")
    assert state.error == ""


def test_state_renders_to_png(start):
    png = state_png(start.state)
    assert png[:4] == b"\x89PNG" and len(png) > 5_000
    empty = state_png(start.model.state(Selection(backbone="test_vit", probe="ep", opacity=3)))
    assert empty[:4] == b"\x89PNG"


def test_the_widget_redraws_the_bars_only_when_they_change(start):
    """The same table gives the same PNG object, other highlighted bars recolour it; no table hides the bars."""
    import dataclasses

    from PIL import Image

    from epviz.explorer.render import BarsFigure

    bars = start.widgets["bars"]
    first = bars.value
    start.set(position=3)
    assert bars.value is first  # an image change does not touch the bars
    table = start.state.table.assign(delta_acc=np.linspace(-0.02, 0.05, len(start.state.table)))
    other = table.assign(highlighted=np.roll(table["highlighted"].to_numpy(), 1))
    figure = BarsFigure()
    drawn = figure.png(dataclasses.replace(start.state, table=table))
    assert drawn[:4] == b"\x89PNG" and figure.png(dataclasses.replace(start.state, table=table)) is drawn
    assert figure.png(dataclasses.replace(start.state, table=other)) != drawn
    image = np.asarray(Image.open(io.BytesIO(start.widgets["figure"].value)).convert("RGB"))
    assert image.shape[0] >= 4 * start.state.image.shape[0]  # upscaled, nearest
    assert ((image[..., 1] == 255) & (image[..., 0] == 0)).any()  # the GT box in lime
    start.set(probe="cls", view="image only")
    assert bytes(bars.value) == b"" and bars.layout.display == "none"


def test_caches_of_chosen_blocks_limit_the_layer_choice(tmp_path, monkeypatch, canvas_sets, test_vit_backbone):
    from epviz.tokens import extract_tokens

    monkeypatch.setenv("EPVIZ_CACHE", str(tmp_path))
    sets = canvas_sets(64, 32)
    for data in sets.values():  # the caches `epviz extract --layers 3 -1 --dtype int8` would write
        extract_tokens(test_vit_backbone, data, [3, -1], dtype="int8", progress=False)
    explorer = Explorer([test_vit_backbone], ["ep"], setting=Setting.fast(), sets=sets, fit_options={"epochs": 1},
                        extract={"layers": [3, -1], "dtype": "int8"})  # fmt: skip
    assert explorer.state.error == "" and explorer.state.layers == [3, 5]
    assert explorer.model.counts["extractions"] == 0, "the existing int8 caches are read, not extracted again"
    assert [v for _, v in explorer.widgets["layer"].options] == [-1, 3, 5]
    chosen = explorer.model.state(Selection(backbone="test_vit", layer=2, probe="ep"))  # from code: not a widget choice
    assert "not in its token caches (blocks [3, 5])" in chosen.error
    explorer.set(layer=3)
    assert explorer.state.error == "" and explorer.state.selection.layer == 3


def test_measured_gives_the_table_with_intervals_beside_chance(start):
    from epviz.analysis.baselines import CENTRE_PRIOR, MATCHED, SALIENCE, UNIFORM

    shown = start.state.table
    tables = start.model.counts["tables"]
    table, chance = start.measured(n_boot=50)
    assert start.model.counts["tables"] == tables  # the interactive table is not recomputed
    # the point values are the interactive table's; the intervals come beside them
    for column in table_columns():
        np.testing.assert_allclose(table[column].to_numpy(float), shown[column].to_numpy(float), equal_nan=True)
    for column in ("delta_acc", "maxboxacc_v2", "inbox_mass", "entropy_norm", "acc_full"):
        lo, hi = table[f"{column}_lo"].to_numpy(float), table[f"{column}_hi"].to_numpy(float)
        assert np.all(lo <= hi), column
    assert (table["acc_full_hi"] - table["acc_full_lo"]).iloc[0] > 0
    assert set(table[["backbone", "probe"]].itertuples(index=False, name=None)) == {("test_vit", "ep")}
    # chance: the trivial maps on the same boxes; the random maps as peaked as the probe's
    assert set(chance["baseline"]) == {UNIFORM, CENTRE_PRIOR, MATCHED, SALIENCE}
    assert chance.loc[chance["baseline"] == UNIFORM, "maxboxacc_v2"].item() == 0
    matched = chance.loc[chance["baseline"] == MATCHED, "entropy_norm"].item()
    assert abs(matched - table["entropy_norm"].mean()) < 1e-3
    again = start.measured(n_boot=50)
    assert again[0] is table and again[1] is chance  # computed once per probe


def test_measured_refuses_a_probe_without_maps_and_no_resamples(start):
    with pytest.raises(ValueError, match="at least 1 resample"):
        start.measured(n_boot=0)
    start.set(probe="cls", view="image only")
    with pytest.raises(ValueError, match="no attention predictors"):
        start.measured(n_boot=10)


def test_a_quicker_second_choice_wins_over_a_slow_first(start, monkeypatch):
    """Two choices computing at once (as the kernel may run them): the later one is what stays shown."""
    import threading

    state_of, first_computing, second_done = start.model.state, threading.Event(), threading.Event()

    def slow_for_the_first(sel):
        if sel.probe == "ep" and sel.view == "all queries":
            first_computing.set()
            second_done.wait(timeout=2.0)  # the first choice is still computing when the second comes
        return state_of(sel)

    monkeypatch.setattr(start.model, "state", slow_for_the_first)
    drawn = start.redraws
    first = threading.Thread(target=lambda: setattr(start.widgets["view"], "value", "all queries"))
    first.start()
    assert first_computing.wait(timeout=30)
    start.widgets["probe"].value = "cls"
    second_done.set()
    first.join(timeout=30)
    assert not first.is_alive()
    assert start.state.selection.probe == "cls" and start.state.selection.view == "all queries"
    assert "no attention predictors" in start.state.error and "no attention predictors" in start.widgets["error"].value
    assert start.widgets["table"].value == ""
    assert start.redraws == drawn + 1, "the overtaken first choice must not draw"
    status = start.widgets["status"].value
    assert f"data-redraws='{start.redraws}'" in status and "&quot;probe&quot;: &quot;cls&quot;" in status
