"""uniform_ablation: the EP shortcut equals the straightforward path; tidy output; bad input."""

import numpy as np
import pytest
import torch

import epviz.probes as probes
from epviz.analysis import ablated_logits, uniform_ablation
from epviz.evaluate import accuracy
from epviz.tokens import TokenSet
from tests.toy_tokens import record_calls, scattered_tokens, sharp_probe

D, C, GRID = 32, 4, (4, 4)
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def tokens():
    return scattered_tokens(160, C, D, GRID)


def sharp(name: str, seed: int = 0, tokens: TokenSet | None = None, **options):
    """A probe with peaked maps (large queries / weights) and non-trivial BatchNorm statistics."""
    return sharp_probe(name, tokens, C, seed, dim=D, grid=GRID, **options)


@pytest.mark.parametrize("name", ["ep", "ep_all"])
def test_fast_path_matches_uniform_forward(tokens, name):
    probe = sharp(name, tokens=tokens)
    b = tokens.batch(np.arange(40))
    with torch.no_grad():
        full, ablated = ablated_logits(probe, b, method="fast")
        ref_full = probe(b.patch, b.prefix)
        ref = torch.stack([probe(b.patch, b.prefix, uniform=[j]) for j in range(probe.num_predictors)])
    assert ablated.shape == (probe.num_predictors, 40, C)
    torch.testing.assert_close(full, ref_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ablated, ref, rtol=1e-5, atol=1e-5)
    # the ablation changes something, so the check above is not vacuous
    assert (ablated - full).abs().amax() > 1e-2


@pytest.mark.parametrize("name", ["ep", "ep_all", "mhca", "cbam"])
def test_matches_straightforward_accuracy(tokens, name):
    probe = sharp(name, tokens=tokens)
    df = uniform_ablation(probe, tokens, batch_size=48)
    full = accuracy(probe, tokens, topk=(1,))["top1"]
    expected = [accuracy(probe, tokens, topk=(1,), uniform=[j])["top1"] for j in range(probe.num_predictors)]
    assert df["predictor"].tolist() == list(range(probe.num_predictors))
    assert np.allclose(df["acc_full"], full)
    assert np.allclose(df["acc_uniform"], expected)
    assert np.allclose(df["delta_acc"], full - np.asarray(expected))
    assert (df["n_images"] == len(tokens)).all()


def test_fast_and_direct_give_the_same_table(tokens):
    probe = sharp("ep", tokens=tokens, num_queries=16)
    fast = uniform_ablation(probe, tokens, method="fast")
    direct = uniform_ablation(probe, tokens, method="direct")
    assert fast.equals(direct)
    assert fast["delta_acc"].abs().max() > 0  # some query matters


def test_context_columns(tokens):
    probe = sharp("ep", tokens=tokens)
    df = uniform_ablation(probe, tokens, context={"seed": 7, "run": "a"}, predictors=[1, 3])
    assert list(df.columns[:5]) == ["backbone", "layer", "probe", "seed", "run"]
    assert df["backbone"].unique().tolist() == ["toy"] and df["layer"].unique().tolist() == [5]
    assert df["probe"].unique().tolist() == ["ep"] and df["seed"].unique().tolist() == [7]
    assert df["predictor"].tolist() == [1, 3]
    plain = TokenSet(patch=tokens.patch, prefix=tokens.prefix, labels=tokens.labels, grid=GRID)
    df = uniform_ablation(probe, plain, context={"probe": "ep-M8"})
    assert df["backbone"].isna().all() and df["seed"].isna().all() and (df["probe"] == "ep-M8").all()


def test_hooks_force_the_direct_path(tokens):
    probe = sharp("ep", tokens=tokens)
    handle = probe.hook_pooled.register_forward_hook(lambda m, i, o: o * torch.linspace(0, 2, o.shape[1]))
    try:
        b = tokens.batch(np.arange(16))
        with torch.no_grad():
            _, ablated = ablated_logits(probe, b)
            ref = torch.stack([probe(b.patch, b.prefix, uniform=[j]) for j in range(probe.num_predictors)])
        torch.testing.assert_close(ablated, ref)
        with pytest.raises(ValueError, match="method='fast'"):
            ablated_logits(probe, b, method="fast")
    finally:
        handle.remove()


def test_fast_requires_ep(tokens):
    with pytest.raises(ValueError, match="method='fast'"):
        uniform_ablation(sharp("mhca"), tokens, method="fast")


@pytest.mark.parametrize("name", ["cls", "gap"])
def test_probe_without_predictors(tokens, name):
    probe = probes.build(name, D, C)
    with pytest.raises(ValueError, match=r"no attention predictors.*\bep\b"):
        uniform_ablation(probe, tokens)


def test_bad_predictor_index(tokens):
    with pytest.raises(ValueError, match="predictors got"):
        uniform_ablation(sharp("ep"), tokens, predictors=[8])


def test_methods_delegate_to_the_probe(tokens, monkeypatch):
    probe = sharp("ep", tokens=tokens)
    b = tokens.batch(np.arange(12))
    calls = record_calls(monkeypatch, probe, "ablated_logits")
    with torch.no_grad():
        auto = ablated_logits(probe, b)
        fast = ablated_logits(probe, b, method="fast")
        assert calls == [12, 12]
        direct = ablated_logits(probe, b, method="direct")  # the base-class loop, not the probe's shortcut
    assert calls == [12, 12]
    torch.testing.assert_close(auto[1], direct[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[0], direct[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="method must be one of"):
        ablated_logits(probe, b, method="quick")


def test_a_batch_of_a_pass_works_like_a_token_batch(tokens):
    from epviz.analysis import MeterBatch

    probe = sharp("mhca", tokens=tokens)
    b = tokens.batch(np.arange(10))
    with torch.no_grad():
        full, ablated = ablated_logits(probe, MeterBatch(probe, b), method="direct")
        ref_full, ref = ablated_logits(probe, b, method="direct")
    assert ablated.shape == (probe.num_predictors, 10, C)
    torch.testing.assert_close(full, ref_full)
    torch.testing.assert_close(ablated, ref)
