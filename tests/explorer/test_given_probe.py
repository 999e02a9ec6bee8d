"""The Explorer shows a probe it is given (a reference head read from disk) without training one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.setting import Setting
from epviz.training import load_reference_head
from tests.data.formats import reference_head_state, write_reference_release

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def reference_head(tmp_path_factory):
    """A released EP head with 4 queries for test_vit's tokens (D=64) and the 10 Fashion-MNIST classes."""
    state = reference_head_state("ep", dim=64, num_classes=10, num_queries=4, seed=7)
    return load_reference_head(write_reference_release(tmp_path_factory.mktemp("release"), state))


@pytest.fixture(scope="module")
def model(tmp_path_factory, canvas_sets, test_vit_backbone, reference_head):
    from epviz.explorer import ExplorerModel

    sets = canvas_sets(8, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPVIZ_CACHE", str(tmp_path_factory.mktemp("explorer-cache")))
        yield ExplorerModel(
            [test_vit_backbone, "tiny-random"],
            {"reference-ep": reference_head},
            trained={("tiny-random", "ep-on-tiny"): reference_head},
            setting=Setting.fast(),
            sets=sets,
        )


def test_a_loaded_reference_head_shows_its_maps_without_training(model, reference_head):
    from epviz.explorer import Selection

    assert list(model.specs) == ["reference-ep", "ep-on-tiny"]
    sel = Selection(backbone="test_vit", probe="reference-ep", view="one query", query=2, queries=16)
    state = model.state(sel)
    assert state.error == "" and model.counts["trainings"] == 0
    assert state.num_predictors == 4 and not state.takes_queries and state.highlighted == [2]
    test = model.tokens("test_vit", -1)["test"]
    with torch.no_grad():
        patch, prefix = (torch.from_numpy(np.array(t[:1], dtype=np.float32)) for t in (test.patch, test.prefix))
        expected = reference_head.attention(patch, prefix)
    assert state.maps.shape == (1, 100)
    np.testing.assert_allclose(state.maps[0], expected[0, 2].numpy(), atol=1e-5)
    assert state.overlay.shape == (64, 64, 4) and len(state.table) == 4
    assert 0.0 <= state.accuracy <= 1.0 and state.predicted_label in model.class_names

    everything = model.state(sel.replace(view="all queries"))
    assert everything.error == "" and everything.maps.shape == (4, 100) and model.counts["trainings"] == 0


def test_given_probes_are_refused_where_they_do_not_fit(model, reference_head):
    from epviz.explorer import ExplorerModel, Selection

    elsewhere = model.state(Selection(backbone="test_vit", probe="ep-on-tiny"))
    assert "given trained for backbone(s) tiny-random only" in elsewhere.error
    narrow = probes.build("ep", 32, 10, num_queries=4)
    other = ExplorerModel([model.backbone("test_vit")], {"narrow": narrow}, setting=Setting.fast(), sets=model.sets)
    assert (
        "reads tokens of width 32, but test_vit block 5 has width 64"
        in other.state(Selection(backbone="test_vit", probe="narrow")).error
    )
    with pytest.raises(ValueError, match="not among this Explorer's backbones"):
        ExplorerModel(["test_vit"], trained={("tiny-mae", "ref"): reference_head}, sets=model.sets)


def test_the_widgets_show_a_given_probe(model, reference_head):
    from epviz.explorer import Explorer

    app = Explorer([model.backbone("test_vit")], {"reference-ep": reference_head}, setting=Setting.fast(), sets=model.sets)
    assert app.state.error == "" and app.state.selection.probe == "reference-ep" and app.state.maps.shape == (1, 100)
    assert app.widgets["queries"].disabled and app.model.counts["trainings"] == 0
