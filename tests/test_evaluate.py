"""predict / accuracy / attention maps on a TokenSet."""

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.evaluate import accuracy, attention_maps, collect_attention, predict, topk_accuracy
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
