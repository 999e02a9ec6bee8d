"""Entropy: known values on hand-made maps, streaming over a probe, bad input."""

import math

import numpy as np
import pytest

import epviz.probes as probes
from epviz.analysis import entropy, entropy_from_maps, map_entropy
from epviz.evaluate import collect_attention
from tests.toy_tokens import noise_tokens, sharp_probe, token_set


def test_uniform_and_one_hot():
    n = 49
    uniform = np.full((3, 1, n), 1 / n)
    onehot = np.zeros((3, 1, n))
    onehot[:, 0, 7] = 1
    df = entropy_from_maps(np.concatenate([uniform, onehot], axis=1))
    assert df["entropy"].tolist() == pytest.approx([math.log(n), 0.0])
    assert df["entropy_norm"].tolist() == pytest.approx([1.0, 0.0])
    assert df["entropy_std"].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    assert (df["num_tokens"] == n).all() and (df["n_images"] == 3).all()


def test_mean_and_std_over_images():
    half = np.zeros(16)
    half[:2] = 0.5  # log 2
    quarter = np.zeros(16)
    quarter[:4] = 0.25  # log 4
    df = entropy_from_maps(np.stack([half, quarter]))  # (n, N): one predictor
    assert df["entropy"].iloc[0] == pytest.approx(1.5 * math.log(2))
    assert df["entropy_std"].iloc[0] == pytest.approx(0.5 * math.log(2))
    assert df["entropy_norm"].iloc[0] == pytest.approx(1.5 * math.log(2) / math.log(16))


def test_unnormalised_maps_are_renormalised():
    assert map_entropy(np.ones((1, 8)) * 3)[0] == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match="non-negative"):
        map_entropy(np.array([[0.5, -0.1, 0.6]]))


def test_probe_streaming_matches_precomputed():
    tokens = noise_tokens(np.random.default_rng(0), 30, layer=2)
    probe = sharp_probe("ep", None, 3, scale=50, num_queries=4)
    df = entropy(probe, tokens, batch_size=7, context={"seed": 0})
    ref = entropy_from_maps(collect_attention(probe, tokens))
    np.testing.assert_allclose(df["entropy"], ref["entropy"], rtol=1e-6)
    np.testing.assert_allclose(df["entropy_std"], ref["entropy_std"], rtol=1e-5)
    assert df["entropy_norm"].between(0, 1).all() and df["entropy_norm"].max() < 0.999
    assert (df["probe"] == "ep").all() and (df["layer"] == 2).all() and (df["seed"] == 0).all()


@pytest.mark.parametrize("name", ["cls", "gap"])
def test_probe_without_predictors(name):
    tokens = token_set(np.zeros((2, 4, 8)), np.zeros((2, 1, 8)), np.array([0, 1]), grid=(2, 2))
    with pytest.raises(ValueError, match="no attention predictors"):
        entropy(probes.build(name, 8, 2), tokens)
