"""A meter defined in one outside file (tests/plugins/toy_meter.py) reaches the table, the figures and the Explorer."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz import viz
from epviz.analysis import meter_names, predictor_table, table_columns, unregister_meter
from epviz.evaluate import collect_attention
from tests.analysis.test_meters import TABLE_COLUMNS as BUILT_IN
from tests.toy_tokens import Boxes, toy_tokens


@pytest.fixture
def toy_meter():
    """Import the plugin file afresh (which registers "peak_mass"); unregister it afterwards."""
    sys.modules.pop("tests.plugins.toy_meter", None)
    module = importlib.import_module("tests.plugins.toy_meter")
    yield module
    unregister_meter("peak_mass")
    sys.modules.pop("tests.plugins.toy_meter", None)
    assert "peak_mass" not in meter_names() and table_columns() == BUILT_IN


@pytest.fixture(scope="module")
def setup():
    tokens, boxes = toy_tokens(24, 0)
    probe = probes.build("ep", 32, 3, num_queries=4, seed=0, grid=(4, 4)).eval()
    with torch.no_grad():
        probe.queries.mul_(60)
    return probe, tokens, Boxes(boxes)


def test_without_the_plugin_only_the_built_in_meters_exist():
    assert "peak_mass" not in meter_names()
    assert table_columns() == BUILT_IN


def test_the_plugin_column_joins_the_predictor_table(toy_meter, setup):
    probe, tokens, boxes = setup
    table = predictor_table(probe, tokens, boxes, context=dict(backbone="toy", probe="ep4"), thresholds=[0.5])
    columns = list(table.columns)
    assert columns[columns.index("predictors") - 1 : columns.index("predictors") + 1] == ["peak_mass", "predictors"]
    assert all(c.endswith(("_lo", "_hi")) for c in columns[columns.index("predictors") + 1 :])  # the intervals
    maps = collect_attention(probe, tokens)
    np.testing.assert_allclose(table["peak_mass"], maps.max(-1).mean(0), rtol=1e-6)
    assert table["peak_mass"].min() > 1 / 16 and table["peak_mass"].max() <= 1
    for column in ("delta_acc", "maxboxacc_v2", "entropy_norm"):  # the built-in measures are still there
        assert table[column].notna().all()


def test_figures_label_the_plugin_axis(toy_meter, setup):
    probe, tokens, boxes = setup
    table = predictor_table(probe, tokens, boxes, context=dict(backbone="toy", probe="ep4"), thresholds=[0.5])
    fig = viz.delta_acc_panels(table, x="peak_mass")
    assert fig.axes[0].get_xlabel() == toy_meter.PEAK_MASS_LABEL
    assert viz.axis_label("peak_mass") == toy_meter.PEAK_MASS_LABEL
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_explorer_table_shows_the_plugin_column(toy_meter):
    pytest.importorskip("ipywidgets")
    from epviz.explorer import table_columns as explorer_columns

    assert explorer_columns() == (*BUILT_IN, "peak_mass")
