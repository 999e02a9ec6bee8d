"""Controls of the uniform ablation as meters: mean training map, shuffled map, zeroed slice."""

import numpy as np
import pandas as pd
import pytest
import torch

import epviz.probes as probes
from epviz.analysis import (
    CONTROL_COLUMNS,
    MeanMapAblation,
    ShuffledAblation,
    ZeroAblation,
    derangement,
    mean_attention_rows,
    measure,
    predictor_table,
    uniform_ablation,
)
from epviz.evaluate import accuracy
from epviz.tokens import TokenSet
from tests.toy_tokens import Boxes, token_set

D, C, GRID = 32, 3, (4, 4)
N = GRID[0] * GRID[1]
CONTROLS = ["mean_map_ablation", "shuffled_ablation", "zero_ablation"]


def fixed_layout_tokens(n: int, seed: int) -> TokenSet:
    """Channels 0-7 hold the same positional pattern in every image; channels 8+ carry noise and the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    pattern = np.random.default_rng(99).normal(size=(N, 8)) * 3
    centres = np.random.default_rng(7).normal(size=(C, D - 8)) * 1.5
    patch = rng.normal(size=(n, N, D))
    patch[:, :, :8] = pattern
    patch[:, : N // 2, 8:] += centres[labels][:, None]
    return token_set(patch, rng.normal(size=(n, 1, D)), labels, GRID, layer=3, num_classes=C)


@pytest.fixture(scope="module")
def train():
    return fixed_layout_tokens(120, 0)


@pytest.fixture(scope="module")
def test():
    return fixed_layout_tokens(60, 1)


def ready(name: str, train: TokenSet, **options) -> probes.Probe:
    """A probe with BatchNorm statistics from `train` and sharp maps."""
    if name.startswith("ep"):
        options.setdefault("num_queries", 4)
    probe = probes.build(name, D, C, grid=GRID, seed=0, **options)
    with torch.no_grad():
        if hasattr(probe, "queries"):
            probe.queries.mul_(80)
        probe.train()
        b = train.batch(np.arange(len(train)))
        probe(b.patch, b.prefix)
    return probe.eval()


def layout_query_ep(train: TokenSet) -> probes.Probe:
    """EP whose queries read only the fixed channels: every image has the same, peaked, maps."""
    probe = ready("ep", train)
    with torch.no_grad():
        probe.queries[:, 8:] = 0
        probe.queries[:, :8] = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) * 4
    return probe


def test_mean_map_of_identical_maps_changes_nothing(train, test):
    probe = layout_query_ep(train)
    with torch.no_grad():
        maps = probe.attention(torch.from_numpy(test.patch))
    assert torch.allclose(maps, maps[:1].expand_as(maps), atol=1e-6)  # the same maps for every image
    assert maps.amax() > 3.0 / N  # and not uniform
    for method in ("auto", "direct"):
        table = measure(probe, test, meters=[MeanMapAblation(train_tokens=train, method=method), "uniform_ablation"])
        np.testing.assert_allclose(table["delta_acc_mean"], 0.0, atol=1e-12)
        assert (table["acc_mean"] == table["acc_full"]).all()
    assert table["delta_acc"].abs().max() > 0  # the uniform map does matter here


def test_mean_map_comes_from_the_training_tokens(train, test):
    probe = ready("mhca", train)
    mean = mean_attention_rows(probe, train, batch_size=32)
    with torch.no_grad():
        expected = probe.attention(torch.from_numpy(train.patch)).mean(0)
    assert mean.shape == (probe.num_predictors, 1, N)
    torch.testing.assert_close(mean[:, 0], expected, rtol=1e-5, atol=1e-6)
    table = measure(probe, test, meters=[MeanMapAblation(train_tokens=train)])
    again = measure(probe, test, meters=[MeanMapAblation(mean_maps=mean)])
    pd.testing.assert_frame_equal(table, again)
    for j in range(probe.num_predictors):
        manual = accuracy(probe, test, topk=(1,))["top1"] - _acc(probe, test, replace={j: mean[j]})
        assert table["delta_acc_mean"][j] == pytest.approx(manual, abs=1e-6)
    with pytest.raises(ValueError, match="must come from the training images"):
        measure(probe, test, meters=[MeanMapAblation(train_tokens=test)])
    with pytest.raises(ValueError, match="either mean_maps= or train_tokens="):
        MeanMapAblation(mean_maps=mean, train_tokens=train)
    with pytest.raises(ValueError, match=r"mean_maps must be \(K="):
        measure(probe, test, meters=[MeanMapAblation(mean_maps=mean[:, :, :-1])])
    without = measure(probe, test, meters=[MeanMapAblation()])
    assert without["delta_acc_mean"].isna().all() and without["acc_mean"].isna().all()


def _acc(probe, tokens, **kwargs) -> float:
    with torch.no_grad():
        b = tokens.batch(np.arange(len(tokens)))
        return float((probe(b.patch, b.prefix, **kwargs).argmax(-1) == b.labels).float().mean())


def test_derangement_is_fixed_point_free_and_seeded():
    for n in (2, 3, 10, 101):
        partner = derangement(n, seed=4)
        assert sorted(partner) == list(range(n)) and (partner != np.arange(n)).all()
    np.testing.assert_array_equal(derangement(50, 1), derangement(50, 1))
    assert (derangement(50, 1) != derangement(50, 2)).any()
    with pytest.raises(ValueError, match="needs another image"):
        derangement(1)


def test_shuffled_map_of_identical_images_changes_nothing(train):
    one = fixed_layout_tokens(1, 5)
    same = TokenSet(
        patch=np.repeat(one.patch, 20, 0),
        prefix=np.repeat(one.prefix, 20, 0),
        labels=np.repeat(one.labels, 20),
        grid=GRID,
        num_classes=C,
    )
    for name in ("ep", "mhca", "dinovit"):
        table = measure(ready(name, train), same, meters=[ShuffledAblation(seed=3), "uniform_ablation"], batch_size=7)
        np.testing.assert_allclose(table["delta_acc_shuffled"], 0.0, atol=1e-12)


@pytest.mark.parametrize("name", ["ep", "ep_all", "mhca", "dinovit"])
def test_shuffled_is_another_images_map_whatever_the_batches(name, train, test):
    probe = ready(name, train)
    small = measure(probe, test, meters=[ShuffledAblation(seed=1)], batch_size=7)
    large = measure(probe, test, meters=[ShuffledAblation(seed=1)], batch_size=64)
    pd.testing.assert_frame_equal(small, large)
    partner = derangement(len(test), 1)
    with torch.no_grad():
        b, other = test.batch(np.arange(len(test))), test.batch(partner)
        rows = probe.attention_rows(other.patch, other.prefix)
        full = (probe(b.patch, b.prefix).argmax(-1) == b.labels).float().mean()
        for j in range(probe.num_predictors):
            acc = (probe(b.patch, b.prefix, replace={j: rows[:, j]}).argmax(-1) == b.labels).float().mean()
            assert small["delta_acc_shuffled"][j] == pytest.approx(float(full - acc))
    other_seed = measure(probe, test, meters=[ShuffledAblation(seed=2)])
    assert other_seed["predictor"].tolist() == small["predictor"].tolist()


@pytest.mark.parametrize("name", ["ep", "ep_all", "esimpool", "aim"])
def test_zero_equals_manual_zeroing_through_hook_pooled(name, train, test):
    probe = ready(name, train)
    table = measure(probe, test, meters=[ZeroAblation(), "uniform_ablation"], batch_size=25)
    slices = probe.predictor_slices()
    for j in range(probe.num_predictors):

        def zero(module, inputs, output, cols=slices[j]):
            output = output.clone()
            output[:, cols] = 0
            return output

        handle = probe.hook_pooled.register_forward_hook(zero)
        try:
            manual = accuracy(probe, test, topk=(1,))["top1"]
        finally:
            handle.remove()
        assert table["acc_zero"][j] == pytest.approx(manual, abs=1e-6)
        assert table["delta_acc_zero"][j] == pytest.approx(table["acc_full"][j] - manual, abs=1e-6)


def test_zero_is_nan_for_probes_that_are_not_sliced(train, test):
    table = measure(ready("mhca", train), test, meters=[ZeroAblation(), "uniform_ablation"])
    assert table["delta_acc_zero"].isna().all() and table["delta_acc"].notna().all()


@pytest.mark.parametrize("name", probes.available(attentive=True, variants=False))
def test_every_attentive_family_gives_every_control_or_declines_it(name, train, test):
    probe = ready(name, train)
    table = measure(probe, test, meters=["uniform_ablation", MeanMapAblation(train_tokens=train), *CONTROLS[1:]], batch_size=32)
    assert len(table) == probe.num_predictors
    for control, column in CONTROL_COLUMNS.items():
        values = table[column].to_numpy()
        if control == "zero" and not type(probe).sliced:
            assert np.isnan(values).all()
        else:
            assert np.isfinite(values).all() and (np.abs(values) <= 1).all(), (control, values)


def test_controls_join_the_predictor_table(train, test):
    boxes = Boxes(np.tile([0.0, 0.0, 32.0, 16.0], (len(test), 1)))
    probe = ready("ep", train)
    table = predictor_table(probe, test, boxes, thresholds=[0.3, 0.6], train_tokens=train, n_boot=50)
    ablation = uniform_ablation(probe, test)
    pd.testing.assert_series_equal(table["delta_acc"], ablation["delta_acc"])  # the paper's number is unchanged
    for column in CONTROL_COLUMNS.values():
        assert table[column].notna().all()
        assert (table[f"{column}_lo"] <= table[column] + 1e-12).all() and (table[column] <= table[f"{column}_hi"] + 1e-12).all()
    assert table.columns.get_loc("delta_acc_mean") > table.columns.get_loc("entropy")
