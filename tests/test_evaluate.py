"""predict / accuracy / attention maps on a TokenSet."""

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.errors import ConfigError, DataError, WeightsError
from epviz.evaluate import (
    Predictions,
    accuracy,
    attention_maps,
    collect_attention,
    knn_predict,
    loss_and_accuracy,
    predict,
    topk_accuracy,
)
from epviz.tokens import TokenSet

D, C, N = 16, 6, 9


@pytest.fixture(scope="module")
def tokens() -> TokenSet:
    rng = np.random.default_rng(0)
    n = 37
    return TokenSet(
        rng.normal(size=(n, N, D)).astype(np.float16),
        rng.normal(size=(n, 1, D)).astype(np.float16),
        rng.integers(0, C, n),
        (3, 3),
        num_classes=C,
    )


@pytest.fixture()
def probe():
    return probes.build("ep", D, C, num_queries=4, seed=0)


def direct_logits(probe, tokens, **kwargs):
    probe.eval()
    with torch.no_grad():
        patch = torch.from_numpy(np.asarray(tokens.patch, dtype=np.float32))
        prefix = torch.from_numpy(np.asarray(tokens.prefix, dtype=np.float32))
        return probe(patch, prefix, **kwargs)


def test_predict(probe, tokens):
    probe.train()
    out = predict(probe, tokens, batch_size=10)
    assert probe.training  # mode restored
    assert out.logits.shape == (37, C) and out.logits.dtype == np.float32
    assert np.array_equal(out.labels, tokens.labels) and np.array_equal(out.index, np.arange(37))
    assert np.allclose(out.logits, direct_logits(probe, tokens).numpy(), atol=1e-5)
    assert np.array_equal(out.preds, out.logits.argmax(1))
    frame = out.to_frame()
    assert list(frame.columns) == ["index", "label", "pred", "correct"] and len(frame) == 37
    assert frame["correct"].mean() == pytest.approx(out.accuracy((1,))["top1"])


def test_predict_subset_and_uniform(probe, tokens):
    out = predict(probe, tokens, index=[5, 2, 30])
    assert out.index.tolist() == [5, 2, 30] and out.labels.tolist() == tokens.labels[[5, 2, 30]].tolist()
    flat = predict(probe, tokens, uniform=[1])
    assert np.allclose(flat.logits, direct_logits(probe, tokens, uniform=[1]).numpy(), atol=1e-5)
    assert not np.allclose(flat.logits, predict(probe, tokens).logits)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 37\)"):
        predict(probe, tokens, index=[40])


def test_accuracy_matches_manual_topk(probe, tokens):
    logits = direct_logits(probe, tokens)
    labels = torch.from_numpy(tokens.labels)
    acc = accuracy(probe, tokens, topk=(1, 3, 10))
    assert set(acc) == {"top1", "top3", "top10"}
    assert acc["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top3 = (logits.topk(3, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert acc["top3"] == pytest.approx(top3)
    assert acc["top10"] == 1.0  # k above the class count counts every sample
    with pytest.raises(ValueError, match="0 samples"):
        topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_attention_maps_stream_batches(probe, tokens):
    expected = probe.eval().attention(torch.from_numpy(np.asarray(tokens.patch, dtype=np.float32))).detach().numpy()
    probe.train()
    seen = []
    for index, maps in attention_maps(probe, tokens, batch_size=8):
        assert torch.is_grad_enabled() and probe.training  # nothing leaks into the caller between batches
        assert maps.shape == (len(index), 4, N) and len(index) <= 8
        seen.append((index, maps))
    assert [len(i) for i, _ in seen] == [8, 8, 8, 8, 5]
    assert np.array_equal(np.concatenate([i for i, _ in seen]), np.arange(37))
    full = collect_attention(probe, tokens, batch_size=8)
    assert full.shape == (37, 4, N) and full.dtype == np.float32
    assert np.allclose(full, expected, atol=1e-6) and np.allclose(full.sum(-1), 1.0, atol=1e-5)
    sub = collect_attention(probe, tokens, index=[3, 1])
    assert np.allclose(sub, expected[[3, 1]], atol=1e-6)
    backwards = collect_attention(probe, tokens, index=np.arange(37)[::-1])  # a negative-stride view
    assert np.allclose(backwards, expected[::-1], atol=1e-6)


def test_errors(tokens):
    gap = probes.build("gap", D, C)
    with pytest.raises(ValueError, match="probe 'gap' has no attention predictors"):
        next(attention_maps(gap, tokens))
    with pytest.raises(ValueError, match="the token set is empty"):
        predict(gap, tokens.subset([]))
    with pytest.raises(ValueError, match="expects tokens of width D=8 but the patch tokens have D=16"):
        predict(probes.build("gap", 8, C), tokens)


# --- labels and arguments out of range -------------------------------------------------------


def with_labels(tokens, labels):
    return TokenSet(tokens.patch, tokens.prefix, np.asarray(labels), tokens.grid)  # no num_classes: the set accepts them


def test_accuracy_refuses_labels_beyond_the_probe(probe, tokens):
    some = with_labels(tokens, np.where(np.arange(37) % 5 == 0, C + 3, tokens.labels))
    with pytest.raises(
        ConfigError,
        match=r"^the labels range from \d+ to 9 \(max label 9\) but probe 'ep' has num_classes=6; labels must lie in \[0, 5\] and 8 of 37",
    ):
        accuracy(probe, some)
    every = with_labels(tokens, np.full(37, C))
    with pytest.raises(ConfigError, match="37 of 37 samples lie outside"):
        accuracy(probe, every)
    negative = with_labels(tokens, np.where(np.arange(37) == 4, -1, tokens.labels))
    with pytest.raises(ConfigError, match="negative labels are not classes"):
        accuracy(probe, negative)


def test_predictions_and_topk_accuracy_check_labels(probe, tokens):
    preds = predict(probe, with_labels(tokens, np.full(37, C)))  # predict itself only carries the labels along
    with pytest.raises(ConfigError, match="the logits has num_classes=6"):
        preds.accuracy()
    with pytest.raises(ConfigError, match="labels range from 0 to 7"):
        topk_accuracy(torch.zeros(3, 6), torch.tensor([0, 7, 1]))
    with pytest.raises(ConfigError, match=r"topk\[0\] must be an integer >= 1, got 0"):
        topk_accuracy(torch.zeros(3, 6), torch.tensor([0, 1, 1]), topk=(0, 5))
    with pytest.raises(DataError, match="one row per label"):
        topk_accuracy(torch.zeros(3, 6), torch.tensor([0, 1]))


def test_loss_and_accuracy_checks_labels(probe, tokens):
    with pytest.raises(ConfigError, match="probe 'ep' has num_classes=6"):
        loss_and_accuracy(probe, with_labels(tokens, np.full(37, C)))


def test_analyses_check_labels(probe, tokens):
    from epviz.analysis import measure, uniform_effect

    bad = with_labels(tokens, np.full(37, C + 1))
    with pytest.raises(ConfigError, match="num_classes=6"):
        measure(probe, bad, meters=["entropy"])
    with pytest.raises(ConfigError, match="num_classes=6"):
        uniform_effect(probe, bad, [0])


@pytest.mark.parametrize(
    "call",
    [
        lambda p, t: predict(p, t, batch_size=0),
        lambda p, t: accuracy(p, t, batch_size=-3),
        lambda p, t: accuracy(p, t, topk=(1, 2.5)),
        lambda p, t: accuracy(p, t, precision="fp16"),
        lambda p, t: predict(p, t, index=[0, 37]),
        lambda p, t: predict(p, t, index=[[0, 1]]),
        lambda p, t: predict(p, t, index=[0.5]),
        lambda p, t: next(attention_maps(p, t, batch_size=0)),
        lambda p, t: collect_attention(p, t, precision="half"),
        lambda p, t: collect_attention(p, t, index=[-1]),
        lambda p, t: loss_and_accuracy(p, t, batch_size=0),
    ],
)
def test_arguments_out_of_range_are_config_errors(probe, tokens, call):
    with pytest.raises(ConfigError):
        call(probe, tokens)


# --- no number from non-finite input -----------------------------------------------------------


def with_nan(tokens, sample=11):
    patch = np.array(tokens.patch)
    patch[sample, 3, 5] = np.nan
    return TokenSet(patch, tokens.prefix, tokens.labels, tokens.grid, num_classes=C)


@pytest.mark.parametrize(
    "call",
    [
        lambda p, t: accuracy(p, t),
        lambda p, t: predict(p, t, index=[0, 1]),  # a NaN outside the samples asked for too
        lambda p, t: loss_and_accuracy(p, t),
        lambda p, t: next(attention_maps(p, t)),
        lambda p, t: collect_attention(p, t),
    ],
)
def test_nan_tokens_are_refused_as_fit_refuses_them(probe, tokens, call):
    with pytest.raises(
        DataError, match=r"the tokens contain NaN or inf \(patch tokens of sample 11; 1 of 37 samples hold NaN or inf\)"
    ):
        call(probe, with_nan(tokens))


def test_every_meter_refuses_nan_tokens(probe, tokens):
    from epviz.analysis import measure
    from epviz.analysis.meters import Meter, meter_class, meter_names

    bad = with_nan(tokens)
    with pytest.raises(DataError, match="the measured tokens contain NaN or inf"):
        measure(probe, bad, meters=["entropy"])
    for name in meter_names():
        with pytest.raises(DataError, match="the measured tokens contain NaN or inf"):
            meter_class(name)().start(probe, bad, None)

    class Plain(Meter):  # a meter of a plugin, with a start of its own that checks nothing
        def start(self, probe, tokens, dataset=None):
            self.started = True

    with pytest.raises(DataError, match="the measured tokens contain NaN or inf"):
        Plain().start(probe, bad)
    Plain().start(probe, tokens)


def test_the_scan_of_read_only_tokens_runs_once(probe, tokens, tmp_path, monkeypatch):
    np.save(tmp_path / "p.npy", np.asarray(tokens.patch))
    np.save(tmp_path / "c.npy", np.asarray(tokens.prefix))
    mapped = TokenSet(
        np.load(tmp_path / "p.npy", mmap_mode="r"), np.load(tmp_path / "c.npy", mmap_mode="r"), tokens.labels, tokens.grid
    )
    scans = []
    real = TokenSet.find_nonfinite

    def counted(self, *args, **kwargs):
        scans.append(self._finite is False)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TokenSet, "find_nonfinite", counted)
    for _ in range(3):
        accuracy(probe, mapped, batch_size=8)
    assert scans == [True, False, False], "scanned on the first call only, not per batch or per call"


def test_nan_logits_are_refused_naming_the_probe(probe, tokens):
    import torch

    with torch.no_grad():
        next(probe.parameters()).view(-1)[0] = float("nan")
    name = next(n for n, _ in probe.named_parameters())
    for call in (lambda: predict(probe, tokens), lambda: accuracy(probe, tokens), lambda: loss_and_accuracy(probe, tokens)):
        with pytest.raises(
            WeightsError,
            match=rf"probe 'ep' produced non-finite logits \(NaN or inf\) for sample 0 .*weights hold NaN or inf \({name}",
        ):
            call()
    with pytest.raises(DataError, match=r"the logits hold NaN or inf \(row 1 first"):
        topk_accuracy(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([1, 0]))


def test_reliability_and_calibration_error_by_hand():
    # confidences 0.9, 0.9 (one right) and 0.6 (right): bins of width 0.5 -> [0.5, 1) holds all three
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    out = Predictions(np.log(probs).astype(np.float32), np.array([0, 1, 1]), np.arange(3))
    np.testing.assert_allclose(out.confidence(), [0.9, 0.9, 0.6], atol=1e-6)
    table = out.reliability(bins=2)
    assert list(table["count"]) == [0, 3] and np.isnan(table.loc[0, "accuracy"])
    assert table.loc[1, "confidence"] == pytest.approx(0.8) and table.loc[1, "accuracy"] == pytest.approx(2 / 3)
    ece = np.abs(out.calibration_gaps(bins=2).mean(axis=0)).sum()
    assert ece == pytest.approx(abs(2 / 3 - 0.8)) == pytest.approx(table["gap"].sum())
    # ten bins separate them: |0.5 - 0.9| * 2/3 + |1 - 0.6| * 1/3
    assert np.abs(out.calibration_gaps(bins=10).mean(axis=0)).sum() == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    with pytest.raises(ConfigError, match="bins"):
        out.reliability(bins=0)


def test_knn_votes_by_cosine_and_refuses_what_it_cannot_read():
    # train: class 0 along +x, class 1 along +y (the [CLS]), the patch means the other way round
    prefix = np.array([[[1.0, 0.0]], [[0.9, 0.1]], [[0.0, 1.0]], [[0.1, 0.9]]], np.float32)
    patch = prefix[:, :, ::-1].repeat(4, axis=1).copy()
    train = TokenSet(patch=patch, prefix=prefix, labels=np.array([0, 0, 1, 1]), grid=(2, 2))
    test = TokenSet(patch=patch[[0, 2]] * 3, prefix=prefix[[0, 2]] * 3, labels=np.array([0, 1]), grid=(2, 2))
    on_cls = knn_predict(train, test, feature="cls", k=2)
    assert on_cls.preds.tolist() == [0, 1] and on_cls.hits().mean() == 1.0, "cosine ignores the scale"
    np.testing.assert_allclose(np.exp(on_cls.logits).sum(1), 1.0, atol=1e-5)  # log vote shares
    assert knn_predict(train, test, feature="gap", k=2).preds.tolist() == [0, 1]
    three = knn_predict(train, test, feature="cls", k=3, temperature=1.0)
    own = np.exp(np.array([1.0, 0.9 / np.hypot(0.9, 0.1)]))  # test 0's two class-0 neighbours, then the nearest class-1 one
    other = np.exp(0.1 / np.hypot(0.9, 0.1))
    assert np.exp(three.logits[0, 1]) == pytest.approx(other / (own.sum() + other), rel=1e-5)
    with pytest.raises(ConfigError, match="k=5"):
        knn_predict(train, test, k=5)
    with pytest.raises(ConfigError, match="feature"):
        knn_predict(train, test, feature="mean")
    no_prefix = TokenSet(patch=patch, prefix=None, labels=np.array([0, 0, 1, 1]), grid=(2, 2))
    with pytest.raises(ConfigError, match="feature='gap'"):
        knn_predict(no_prefix, no_prefix, feature="cls", k=1)
