"""Bootstrap intervals over test images: weights, the resampled measures, the predictor table, Spearman ρ."""

import numpy as np
import pandas as pd
import pytest
import torch

import epviz.analysis.intervals as intervals
import epviz.probes as probes
from epviz.analysis import (
    Bootstrap,
    Localization,
    LocalizationMeter,
    UniformAblation,
    bootstrap_mean,
    measure,
    predictor_table,
    predictor_tables,
    spearman,
    spearman_intervals,
    uniform_ablation,
)
from epviz.analysis.intervals import (
    bootstrap_weights,
    percentile_interval,
    resample_box_accuracy,
    resample_maxboxacc,
)
from epviz.analysis.stats import partial_rho
from tests.toy_tokens import Boxes, toy_tokens


def test_bootstrap_mean_contains_the_estimate_and_is_seeded():
    values = np.random.default_rng(0).random(200) < 0.3
    est = bootstrap_mean(values, n_boot=500, seed=1)
    assert est.estimate == pytest.approx(values.mean())
    assert est.lo < est.estimate < est.hi
    assert bootstrap_mean(values, n_boot=500, seed=1) == est
    assert bootstrap_mean(values, n_boot=500, seed=2) != est


def test_interval_shrinks_with_more_images():
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 500, 5000):
        est = bootstrap_mean(rng.random(n) < 0.3, n_boot=400, seed=0)
        widths.append(est.hi - est.lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.35)  # ~ 1 / sqrt(n)


def test_constant_measure_has_a_degenerate_interval():
    est = bootstrap_mean(np.full(40, 0.25), n_boot=200)
    assert est.lo == est.hi == est.estimate == 0.25


def test_weights_are_counts_within_each_stratum(monkeypatch):
    strata = [np.array([0, 2, 4]), np.array([1, 3]), np.array([5])]
    monkeypatch.setattr(intervals, "_WEIGHT_BUDGET", 12)  # 2 resamples per chunk
    chunks = list(bootstrap_weights(strata, n_boot=7, seed=0))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    w = np.concatenate(chunks)
    assert (w == np.round(w)).all() and (w >= 0).all()
    for cols in strata:
        assert (w[:, cols].sum(1) == len(cols)).all()
    again = np.concatenate(list(bootstrap_weights(strata, n_boot=7, seed=0)))
    np.testing.assert_array_equal(w, again)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1"):
        next(bootstrap_weights(3, n_boot=0))


def test_percentile_interval_ignores_nan():
    samples = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan]])
    lo, hi = percentile_interval(samples, 0.5)
    assert lo[0] == 1.5 and hi[0] == 2.5 and np.isnan(lo[1]) and np.isnan(hi[1])
    with pytest.raises(ValueError, match=r"level must be a finite number in \(0, 1\)"):
        percentile_interval(samples, 95)


def test_packed_box_records_give_the_weighted_accuracy(monkeypatch):
    rng = np.random.default_rng(0)
    correct = rng.random((30, 2, 5, 3)) < 0.4
    packed = np.packbits(correct.reshape(30, -1), axis=1)
    weights = rng.multinomial(30, np.full(30, 1 / 30), size=4).astype(np.float32)
    monkeypatch.setattr(intervals, "_UNPACK_BUDGET", 64)  # several image chunks
    acc = resample_box_accuracy(packed, (2, 5, 3), weights)
    expected = np.einsum("bn,nktd->bktd", weights, correct.astype(float)) / 30
    np.testing.assert_allclose(acc, expected)
    monkeypatch.setattr(intervals, "_UNPACK_BUDGET", 40)  # MaxBoxAccV2 a resample at a time
    np.testing.assert_allclose(resample_maxboxacc(packed, (2, 5, 3), weights), expected.max(axis=2).mean(axis=2))


# --- MaxBoxAccV2: the best tau is chosen inside every resample --------------------------------


def box_maps(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One predictor on a 4x4 grid, 16x16 images: a bright block the GT box matches only at some thresholds."""
    rng = np.random.default_rng(seed)
    maps = np.full((n, 1, 16), 0.01)
    grid = maps.reshape(n, 4, 4)
    for i in range(n):
        r, c = rng.integers(0, 3, 2)
        grid[i, r : r + 2, c : c + 2] = rng.uniform(0.3, 1.0, (2, 2))  # the object, uneven
        grid[i, rng.integers(0, 4), rng.integers(0, 4)] += rng.uniform(0, 0.6)  # a distractor
    boxes = np.array([[4.0 * c, 4.0 * r, 4.0 * c + 8, 4.0 * r + 8] for r, c in (np.argwhere(g > 0.29).min(0) for g in grid)])
    return maps / maps.sum(-1, keepdims=True), boxes


def test_maxboxacc_resample_equals_the_measure_on_the_resampled_images():
    maps, boxes = box_maps(40, 0)
    thresholds = [0.1, 0.3, 0.5, 0.7, 0.9]
    meter = LocalizationMeter(1, (4, 4), 16, thresholds, records=True)
    meter.update(maps, list(boxes))
    weights = np.concatenate(list(bootstrap_weights(40, n_boot=30, seed=5)))
    acc = resample_box_accuracy(meter.image_records()["box"], (1, 5, 3), weights)
    resampled = acc.max(axis=2).mean(axis=2)[:, 0]
    best_tau = acc.argmax(axis=2)[:, 0]  # (b, deltas)
    for row, w in enumerate(weights):
        draw = np.repeat(np.arange(40), w.astype(int))
        again = LocalizationMeter(1, (4, 4), 16, thresholds)
        again.update(maps[draw], list(boxes[draw]))
        assert resampled[row] == pytest.approx(again.rows()[0]["maxboxacc_v2"])
    point = meter.accuracy()[0].argmax(axis=0)  # the best tau per delta on all the images
    assert (best_tau != point).any(), "some resample picks another tau: the rule is applied inside each resample"


def test_localization_meter_resamples_every_column():
    maps, boxes = box_maps(25, 1)
    meter = LocalizationMeter(1, (4, 4), 16, [0.2, 0.5], records=True)
    meter.update(maps[:10], list(boxes[:10]))
    meter.update(maps[10:], list(boxes[10:]))
    rec = meter.image_records()
    assert rec["box"].shape == (25, 1) and rec["mass"].shape == (25, 1) and rec["pointing"].shape == (25, 1)
    row = meter.rows()[0]
    assert rec["mass"].mean() == pytest.approx(row["inbox_mass"], rel=1e-6)
    assert rec["pointing"].mean() == pytest.approx(row["pointing"])
    with pytest.raises(ValueError, match="records=True"):
        LocalizationMeter(1, (4, 4), 16).image_records()


# --- through the predictor table --------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    train, _ = toy_tokens(60, 0)
    test, boxes = toy_tokens(45, 2)
    rng = np.random.default_rng(0)
    test.patch[:] += rng.normal(size=test.patch.shape).astype(np.float32) * 2  # a harder task: Δacc varies
    probe = probes.build("ep", 32, 3, num_queries=4, seed=0, grid=(4, 4))
    with torch.no_grad():
        probe.queries.mul_(60)
        probe.train()
        probe(torch.from_numpy(train.patch), torch.from_numpy(train.prefix))
    return probe.eval(), train, test, Boxes(boxes)


COLUMNS = (
    "acc_full",
    "delta_acc",
    "delta_acc_mean",
    "delta_acc_shuffled",
    "delta_acc_zero",
    "maxboxacc_v2",
    "inbox_mass",
    "pointing",
)


def test_table_intervals_contain_the_point_estimates_and_are_seeded(setup):
    probe, train, test, boxes = setup
    table = predictor_table(probe, test, boxes, thresholds=[0.2, 0.5, 0.8], train_tokens=train, n_boot=300)
    for column in COLUMNS:
        lo, hi = table[f"{column}_lo"], table[f"{column}_hi"]
        assert ((lo <= table[column] + 1e-9) & (table[column] <= hi + 1e-9)).all(), column
    assert (table["delta_acc_hi"] > table["delta_acc_lo"]).any() and (table["maxboxacc_v2_hi"] > table["maxboxacc_v2_lo"]).all()
    again = predictor_table(probe, test, boxes, thresholds=[0.2, 0.5, 0.8], train_tokens=train, n_boot=300)
    pd.testing.assert_frame_equal(table, again)
    other = predictor_table(probe, test, boxes, thresholds=[0.2, 0.5, 0.8], train_tokens=train, n_boot=300, boot_seed=1)
    assert not other["maxboxacc_v2_lo"].equals(table["maxboxacc_v2_lo"])
    none = predictor_table(probe, test, boxes, thresholds=[0.2, 0.5, 0.8], n_boot=0)
    assert not any(c.endswith(("_lo", "_hi")) for c in none.columns)
    pd.testing.assert_series_equal(none["delta_acc"], table["delta_acc"])


def test_delta_acc_resample_equals_the_ablation_on_the_resampled_images(setup):
    probe, _, test, boxes = setup
    table, records = predictor_tables({("toy", "ep4"): probe}, {"toy": {"test": test}}, boxes, thresholds=[0.5], n_boot=5)
    records = records["toy", "ep4"]
    weights = next(bootstrap_weights([np.arange(len(test))], n_boot=5, seed=0))
    draw = np.repeat(np.arange(len(test)), weights[0].astype(int))
    again = uniform_ablation(probe, test, index=draw)
    samples = records.samples()
    np.testing.assert_allclose(samples["delta_acc"].iloc[0], again["delta_acc"], atol=1e-12)
    np.testing.assert_allclose(samples["acc_full"].iloc[0], again["acc_full"], atol=1e-12)


def test_subsets_are_resampled_within_themselves(setup):
    """With localization on 10 of the 45 images, every resample gives each meter its own number of images."""
    probe, _, test, boxes = setup
    ablation, loc = UniformAblation(), Localization(thresholds=[0.5])
    measure(probe, test, boxes, [ablation, loc], localization_index=range(10))
    seen = {}
    for meter in (ablation, loc):

        def spy(weights, meter=meter, resample=meter.resample):
            seen.setdefault(type(meter).__name__, []).append(weights.sum(1))
            return resample(weights)

        meter.resample = spy
    Bootstrap([ablation, loc], n_boot=20).samples()
    assert (np.concatenate(seen["UniformAblation"]) == len(test)).all()
    assert (np.concatenate(seen["Localization"]) == 10).all()


def test_spearman_interval_of_two_measures(setup):
    probe, train, test, boxes = setup
    table, records = predictor_tables(
        {("toy", "ep4"): probe}, {"toy": {"test": test, "train": train}}, boxes, thresholds=[0.2, 0.5, 0.8], n_boot=300
    )
    records = records["toy", "ep4"]
    r = records.spearman("delta_acc", "maxboxacc_v2")
    assert r.rho == pytest.approx(spearman(table["delta_acc"], table["maxboxacc_v2"]).rho, nan_ok=True)
    assert r.lo <= r.hi and 0 <= r.undefined < 1
    same = records.spearman("delta_acc", "delta_acc")
    assert same.lo == same.hi == 1.0
    frame = spearman_intervals({("toy", "ep4"): records}, [("delta_acc", "delta_acc_mean"), ("delta_acc", "inbox_mass")])
    assert list(frame.columns[:4]) == ["backbone", "layer", "probe", "seed"]
    assert frame[["x", "y"]].values.tolist() == [["delta_acc", "delta_acc_mean"], ["delta_acc", "inbox_mass"]]
    assert ((frame["rho_lo"] <= frame["rho_hi"]) | frame["rho_lo"].isna()).all()
    # the entropy keeps per-image records too: its interval and rho against it
    h = records.spearman("delta_acc", "entropy_norm")
    assert h.rho == pytest.approx(spearman(table["delta_acc"], table["entropy_norm"]).rho, nan_ok=True) and h.lo <= h.hi
    assert (table["entropy_norm_lo"] <= table["entropy_norm"] + 1e-9).all() and (
        table["entropy_norm"] <= table["entropy_norm_hi"] + 1e-9
    ).all()
    assert (table["entropy_norm_hi"] > table["entropy_norm_lo"]).all()
    partial = records.spearman("delta_acc", "maxboxacc_v2", given="entropy_norm")
    expected = partial_rho(
        *(spearman(table[a], table[b]).rho for a, b in [("delta_acc", "maxboxacc_v2"), ("delta_acc", "entropy_norm"),
                                                         ("maxboxacc_v2", "entropy_norm")])
    )  # fmt: skip
    assert partial.rho == pytest.approx(float(expected), nan_ok=True) and (partial.lo <= partial.hi or np.isnan(partial.lo))
    triple = spearman_intervals({("toy", "ep4"): records}, [("delta_acc", "maxboxacc_v2", "entropy_norm")])
    assert triple.loc[0, "given"] == "entropy_norm" and triple.loc[0, "rho"] == pytest.approx(partial.rho, nan_ok=True)
    with pytest.raises(KeyError, match="no bootstrap records"):
        records.spearman("delta_acc", "pointing_entropy")
    with pytest.raises(KeyError, match="no probe has bootstrap records"):
        spearman_intervals({("toy", "ep4"): records}, [("delta_acc", "pointing_entropy")])


def test_spearman_of_a_constant_measure_is_undefined():
    class Constant:
        def __init__(self, column, values):
            self.column, self.values = column, np.asarray(values, float)

        def positions(self):
            return np.arange(10)

        def summary(self):
            return pd.DataFrame({"predictor": range(len(self.values)), self.column: self.values})

        def resample(self, weights):
            return {self.column: np.tile(self.values, (len(weights), 1))}

    boot = Bootstrap([Constant("a", [0.1, 0.1, 0.1]), Constant("b", [0.3, 0.1, 0.2])], n_boot=50)
    r = boot.spearman("a", "b")
    assert np.isnan(r.rho) and np.isnan(r.lo) and r.undefined == 1.0
    lohi = boot.intervals()
    assert (lohi["a_lo"] == 0.1).all() and (lohi["a_hi"] == 0.1).all()  # degenerate for a constant measure


def test_group_means_gives_each_groups_mean_and_its_bootstrap_interval():
    from epviz.analysis.intervals import bootstrap_mean, group_means

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"backbone": ["b"] * 50 + ["a"] * 30, "score": rng.normal(size=80), "hit": rng.random(80) < 0.3})
    table.loc[3, "score"] = np.nan
    out = group_means(table, ["backbone"], ["score", "hit"], n_boot=300)
    assert out["backbone"].tolist() == ["b", "a"], "first appearance order"
    b = table[table["backbone"] == "b"]["score"].dropna().to_numpy()
    expected = bootstrap_mean(b, 300)
    row = out.iloc[0]
    assert row["score"] == pytest.approx(b.mean()) and row["score_n"] == 49
    assert (row["score_lo"], row["score_hi"]) == pytest.approx((expected.lo, expected.hi))
    assert out.loc[1, "hit_lo"] <= out.loc[1, "hit"] <= out.loc[1, "hit_hi"]
    with pytest.raises(ValueError, match="not in the table"):
        group_means(table, ["probe"], ["score"])


# --- paired differences: seeds and images both vary ----------------------------------------


def test_paired_difference_of_a_constant_shift_is_exact():
    from epviz.analysis.intervals import paired_difference

    rng = np.random.default_rng(0)
    b = rng.random((1, 300))
    result = paired_difference(b + 0.1, b)
    assert result.estimate == pytest.approx(0.1) and result.lo == pytest.approx(0.1) and result.hi == pytest.approx(0.1)
    assert result.verdict == "a > b" and result.seeds == (1, 1) and result.images == 300


def test_paired_difference_pools_seed_and_image_variance():
    from epviz.analysis.intervals import paired_difference

    rng = np.random.default_rng(1)
    images = rng.normal(size=400)
    a = images + 0.05 + rng.normal(scale=0.01, size=(1, 400))
    b = images + rng.normal(scale=0.01, size=(1, 400))
    tight = paired_difference(a, b)
    assert tight.verdict == "a > b", "pairing on images removes their variance"
    offsets = np.array([[-0.2], [0.0], [0.25]])  # heads of three seeds differ by much more than 0.05
    spread = paired_difference(a + offsets, b + offsets[::-1])
    assert spread.verdict == "not resolved" and spread.hi - spread.lo > 5 * (tight.hi - tight.lo)
    assert spread.seeds == (3, 3)
    with pytest.raises(ValueError, match="same test images"):
        paired_difference(a, b[:, :10])
