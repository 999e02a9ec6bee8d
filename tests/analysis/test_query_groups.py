"""Query groups: overlap of hand-made maps, grouping, group maps, a probe end to end."""

import numpy as np
import pytest

import epviz.probes as probes
from epviz.analysis import group_contrast, group_maps, group_queries, pairwise_overlap, query_groups
from epviz.evaluate import collect_attention
from tests.toy_tokens import noise_tokens, sharp_probe, token_set

N = 16


def halves(n_images: int = 3) -> np.ndarray:
    """K=5 maps: 0, 3 on the left half, 1, 4 on the right half, 2 on everything."""
    left, right = np.zeros(N), np.zeros(N)
    left[: N // 2], right[N // 2 :] = 2 / N, 2 / N
    one = np.stack([left, right, np.full(N, 1 / N), left, right])
    return np.repeat(one[None], n_images, axis=0)


def test_intersection_overlap():
    overlap = pairwise_overlap(halves())
    assert overlap[0, 3] == pytest.approx(1.0) and overlap[1, 4] == pytest.approx(1.0)
    assert overlap[0, 1] == pytest.approx(0.0) and overlap[0, 2] == pytest.approx(0.5)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    np.testing.assert_allclose(overlap, overlap.T)


def test_cosine_overlap():
    overlap = pairwise_overlap(halves(), metric="cosine")
    assert overlap[0, 3] == pytest.approx(1.0) and overlap[0, 1] == pytest.approx(0.0)
    assert overlap[0, 2] == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="metric"):
        pairwise_overlap(halves(), metric="dot")


def test_grouping_and_group_maps():
    maps = halves()
    labels = group_queries(pairwise_overlap(maps), 2)
    assert labels[0] == labels[3] and labels[1] == labels[4] and labels[0] != labels[1]
    assert labels[0] == 0  # groups are numbered by their lowest member
    labels = group_queries(pairwise_overlap(maps), 3)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    g = group_maps(maps, labels)
    assert g.shape == (3, 3, N)
    np.testing.assert_allclose(g[:, 0], maps[:, 0] + maps[:, 3])
    np.testing.assert_allclose(g[:, 2], maps[:, 2])
    np.testing.assert_allclose(g.sum(-1), [[2, 2, 1]] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="n_groups"):
        group_queries(pairwise_overlap(maps), 6)


def test_probe_end_to_end():
    tokens = noise_tokens(np.random.default_rng(0), 20, layer=0)
    probe = sharp_probe("ep", None, 3, scale=100, num_queries=8)
    result = query_groups(probe, tokens, n_groups=3, maps_index=[4, 2], batch_size=6)
    maps = collect_attention(probe, tokens)
    np.testing.assert_allclose(result.overlap, pairwise_overlap(maps), rtol=1e-5, atol=1e-7)
    assert result.labels.shape == (8,) and set(result.labels.tolist()) == {0, 1, 2} and result.num_groups == 3
    assert len(result.pairs) == 8 * 7 // 2 and (result.pairs["probe"] == "ep").all()
    sizes = result.assignment.groupby("group")["predictor"].count()
    assert (result.assignment["group_size"] == result.assignment["group"].map(sizes)).all()
    np.testing.assert_allclose(result.maps, group_maps(maps[[4, 2]], result.labels), rtol=1e-6)
    np.testing.assert_allclose(result.group_maps(maps[:3]), group_maps(maps[:3], result.labels))
    same = result.pairs["same_group"].to_numpy()
    a, b = result.pairs["predictor_a"].to_numpy(), result.pairs["predictor_b"].to_numpy()
    assert (same == (result.labels[a] == result.labels[b])).all()


@pytest.mark.parametrize("name", ["cls", "gap"])
def test_probe_without_predictors(name):
    tokens = token_set(np.zeros((2, 4, 8)), np.zeros((2, 1, 8)), np.array([0, 1]), grid=(2, 2))
    with pytest.raises(ValueError, match="no attention predictors"):
        query_groups(probes.build(name, 8, 2), tokens)


def test_group_contrast_by_hand_and_its_intervals():
    # 4 predictors on 4 tokens: 0 and 1 look at token 0, 2 and 3 at token 3, with noise per image
    rng = np.random.default_rng(0)
    base = np.array([[0.9, 0.1, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7], [0.0, 0.1, 0.1, 0.8]])
    maps = np.clip(base[None] + rng.uniform(0, 0.05, size=(200, 4, 4)), 0, None)
    out = group_contrast(maps, [0, 0, 1, 1], context={"backbone": "toy"})
    p = maps / maps.sum(-1, keepdims=True)
    within = (np.minimum(p[:, 0], p[:, 1]).sum(-1) + np.minimum(p[:, 2], p[:, 3]).sum(-1)) / 2
    between = np.mean([np.minimum(p[:, a], p[:, b]).sum(-1) for a in (0, 1) for b in (2, 3)], axis=0)
    row = out.iloc[0]
    assert row["backbone"] == "toy" and row["n_images"] == 200 and row["pairs_within"] == 2 and row["pairs_between"] == 4
    assert row["within"] == pytest.approx(within.mean()) and row["between"] == pytest.approx(between.mean())
    assert row["difference"] == pytest.approx(within.mean() - between.mean())
    for name in ("within", "between", "difference"):
        assert row[f"{name}_lo"] < row[name] < row[f"{name}_hi"]
    assert row["difference_lo"] > 0.5, "the two groups barely overlap"
    # a grouping against the structure: no contrast, and an interval around 0 or below
    wrong = group_contrast(maps, [0, 1, 0, 1]).iloc[0]
    assert wrong["difference_hi"] < 0
    singletons = group_contrast(maps, [0, 1, 2, 3]).iloc[0]
    assert np.isnan(singletons["within"]) and np.isnan(singletons["difference"]) and singletons["between"] > 0
    with pytest.raises(ValueError, match="labels must give a group"):
        group_contrast(maps, [0, 1])
