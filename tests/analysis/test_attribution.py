"""Attribution (captum) beside the attention maps: predictor importance, token relevance, agreement."""

import numpy as np
import pandas as pd
import pytest
import torch

import epviz.probes as probes
from epviz.analysis import (
    attention_agreement,
    attribution_vs_attention,
    importance_rank,
    importance_vs_ablation,
    join_importance,
    predictor_importance,
    sliced_probe_names,
    token_attribution,
    topk_overlap,
    uniform_ablation,
)
from epviz.evaluate import accuracy, collect_attention
from epviz.tokens import TokenSet
from tests.toy_tokens import scattered_tokens, sharp_probe

D, C, GRID = 32, 4, (4, 4)
N = GRID[0] * GRID[1]
K = 8


@pytest.fixture(scope="module")
def tokens():
    return scattered_tokens(120, C, D, GRID)


def sharp(name: str, tokens: TokenSet, seed: int = 0, **options):
    """A probe with peaked maps and BatchNorm statistics set by one train-mode pass."""
    return sharp_probe(
        name, tokens, C, seed, dim=D, grid=GRID, **{"num_queries": K, **options} if name.startswith("ep") else options
    )


def true_class_scores(probe, tokens, pooled_edit=None):
    """Mean true-class logit, probability and accuracy, optionally editing the pooled feature first."""
    b = tokens.batch(np.arange(len(tokens)))
    with torch.no_grad():
        y = probe.pooled(b.patch, b.prefix)
        if pooled_edit is not None:
            y = pooled_edit(y.clone())
        logits = probe.head(probe.norm(y)).double()
    true = logits.gather(1, b.labels[:, None])[:, 0]
    prob = logits.softmax(-1).gather(1, b.labels[:, None])[:, 0]
    return true.mean().item(), prob.mean().item(), (logits.argmax(-1) == b.labels).double().mean().item()


# --- predictor importance ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ep", "ep_all", "aim", "simpool"])
def test_importance_has_one_row_per_predictor_and_matches_a_manual_ablation(tokens, name):
    probe = sharp(name, tokens)
    df = predictor_importance(probe, tokens, batch_size=50)
    k = probe.num_predictors
    assert df["predictor"].tolist() == list(range(k))
    assert list(df.columns[:4]) == ["backbone", "layer", "probe", "seed"]
    assert (df["backbone"] == "toy").all() and (df["probe"] == name).all() and (df["n_images"] == len(tokens)).all()
    full_logit, full_prob, full_acc = true_class_scores(probe, tokens)
    assert np.allclose(df["acc_full"], accuracy(probe, tokens, topk=(1,))["top1"])
    assert np.allclose(df["logit_full"], full_logit, atol=1e-5)
    for j, cols in enumerate(probe.predictor_slices()):

        def ablate(y, cols=cols):
            y[:, cols] = probe.norm.running_mean[cols]
            return y

        logit, prob, acc = true_class_scores(probe, tokens, ablate)
        row = df.iloc[j]
        assert row["importance_logit"] == pytest.approx(full_logit - logit, abs=1e-5)
        assert row["importance_prob"] == pytest.approx(full_prob - prob, abs=1e-6)
        assert row["importance_acc"] == pytest.approx(full_acc - acc, abs=1e-9)
        assert row["acc_ablated"] == pytest.approx(acc, abs=1e-9)
    assert df["importance_logit"].abs().max() > 1e-3  # the checks above are not vacuous


@pytest.mark.parametrize("baseline", ["running_mean", "mean", "zero"])
def test_a_predictor_the_classifier_ignores_has_zero_importance(tokens, baseline):
    probe = sharp("ep", tokens)
    dead = 3
    with torch.no_grad():
        probe.head.weight[:, probe.predictor_slices()[dead]] = 0.0
    df = predictor_importance(probe, tokens, baseline=baseline)
    for column in ("importance_logit", "importance_prob", "importance_acc"):
        assert df.loc[dead, column] == pytest.approx(0.0, abs=1e-6), column
    assert df.drop(index=dead)["importance_logit"].abs().max() > 1e-3


def test_running_mean_baseline_zeroes_the_normalised_slice(tokens):
    """Ablating every query to the running mean leaves only the classifier's bias."""
    probe = sharp("ep", tokens)
    everything = torch.zeros(1, probe.width, dtype=torch.long)
    df = predictor_importance(probe, tokens, feature_mask=everything)
    assert df["predictor"].tolist() == [0]
    labels = torch.as_tensor(tokens.labels)
    bias = probe.head.bias.detach()
    full_logit, _, full_acc = true_class_scores(probe, tokens)
    acc_bias_only = (labels == bias.argmax()).double().mean().item()
    assert df.loc[0, "importance_acc"] == pytest.approx(full_acc - acc_bias_only, abs=1e-9)
    assert df.loc[0, "importance_logit"] == pytest.approx(full_logit - bias[labels].mean().item(), abs=1e-5)
    assert df.loc[0, "acc_ablated"] == pytest.approx(acc_bias_only, abs=1e-9)


def test_columns_in_no_group_get_no_row(tokens):
    probe = sharp("ep", tokens)
    mask = probe.feature_mask().clone()
    mask[mask == 0] = -1
    partial = predictor_importance(probe, tokens, feature_mask=mask)
    full = predictor_importance(probe, tokens)
    assert partial["predictor"].tolist() == list(range(1, K))
    cols = ["importance_logit", "importance_prob", "importance_acc"]
    np.testing.assert_allclose(partial[cols], full[cols].iloc[1:], atol=1e-6)


def test_importance_does_not_depend_on_batch_size_or_order(tokens):
    probe = sharp("ep", tokens)
    a = predictor_importance(probe, tokens, batch_size=7, index=np.arange(100))
    b = predictor_importance(probe, tokens, batch_size=100, index=np.arange(100)[::-1])
    cols = ["importance_logit", "importance_prob", "importance_acc"]
    np.testing.assert_allclose(a[cols], b[cols], atol=1e-5)
    assert (a["n_images"] == 100).all()


def test_importance_bad_input_fails_clearly(tokens):
    gap = probes.build("gap", D, C)
    with pytest.raises(ValueError, match="no attention predictors"):
        predictor_importance(gap, tokens)
    for name in ("mhca", "cbam"):  # W_O mixes the heads; one spatial map feeds every column
        with pytest.raises(ValueError, match="share their pooled columns.*'ep'.*feature_mask"):
            predictor_importance(sharp(name, tokens), tokens)
    assert {"ep", "ep_all", "aim", "simpool"} <= set(sliced_probe_names()) and "mhca" not in sliced_probe_names()
    probe = sharp("ep", tokens)
    with pytest.raises(ValueError, match="baseline must be one of"):
        predictor_importance(probe, tokens, baseline="median")
    with pytest.raises(ValueError, match=f"each of the {probe.width} pooled columns"):
        predictor_importance(probe, tokens, feature_mask=torch.zeros(1, probe.width + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer group ids"):
        predictor_importance(probe, tokens, feature_mask=torch.zeros(probe.width))
    with pytest.raises(ValueError, match="one value per pooled column"):
        predictor_importance(probe, tokens, baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="no samples"):
        predictor_importance(probe, tokens, index=[])


# --- comparison with uniform ablation ---------------------------------------------------------------


def test_importance_vs_ablation_gives_a_spearman_rho_per_probe(tokens):
    probe = sharp("ep", tokens)
    imp = predictor_importance(probe, tokens, context={"seed": 0})
    abl = uniform_ablation(probe, tokens, context={"seed": 0})
    summary = importance_vs_ablation(imp, abl)
    assert len(summary) == 1 and summary.loc[0, "predictors"] == K
    assert summary.loc[0, "backbone"] == "toy" and summary.loc[0, "probe"] == "ep"
    rho = summary.loc[0, "rho"]
    assert -1 <= rho <= 1
    joined = join_importance(imp, abl)
    assert rho == pytest.approx(joined["importance_acc"].corr(joined["delta_acc"], method="spearman"))
    assert summary.loc[0, "mean_delta_acc"] == pytest.approx(abl["delta_acc"].mean())


def test_importance_rank_interval_is_the_bootstrap_of_per_image_ablations(tokens):
    from epviz.analysis.intervals import bootstrap_weights, percentile_interval, weighted_mean
    from epviz.analysis.stats import row_spearman
    from epviz.evaluate import predict

    probe = sharp("ep", tokens)
    out = importance_rank(probe, tokens, context={"seed": 0}, columns=("importance_acc", "importance_logit"), n_boot=200)
    alone = predictor_importance(probe, tokens, context={"seed": 0})
    np.testing.assert_allclose(out.importance["importance_acc"], alone["importance_acc"], atol=1e-12)
    np.testing.assert_allclose(out.ablation["delta_acc"], uniform_ablation(probe, tokens)["delta_acc"], atol=1e-12)
    assert out.rank["column"].tolist() == ["importance_acc", "importance_logit"]
    point = importance_vs_ablation(out.importance, out.ablation, column="importance_acc")
    row = out.rank.iloc[0]
    assert row["rho"] == pytest.approx(point.loc[0, "rho"]) and row["rho_lo"] <= row["rho_hi"]
    # the same interval from per-image correctness computed independently: the pooled slice set to its
    # running mean (the importance) and each query made uniform (Δacc), on the same resamples
    b = tokens.batch(np.arange(len(tokens)))
    with torch.no_grad():
        y = probe.pooled(b.patch, b.prefix)
        correct = (probe.head(probe.norm(y)).argmax(-1) == b.labels).double().numpy()
        sliced = []
        for cols in probe.predictor_slices():
            edited = y.clone()
            edited[:, cols] = probe.norm.running_mean[cols]
            sliced.append((probe.head(probe.norm(edited)).argmax(-1) == b.labels).double().numpy())
    drops = correct[:, None] - np.stack(sliced, 1)
    uniform = np.stack([predict(probe, tokens, uniform=[j]).preds == tokens.labels for j in range(K)], 1).astype(float)
    rhos = []
    for w in bootstrap_weights(len(tokens), 200, 0):
        delta = weighted_mean(w, correct)[:, None] - weighted_mean(w, uniform)
        rhos.append(row_spearman(weighted_mean(w, drops), delta))
    lo, hi = percentile_interval(np.concatenate(rhos))
    assert row["rho_lo"] == pytest.approx(lo) and row["rho_hi"] == pytest.approx(hi)
    assert 0 <= row["rho_undefined"] < 1
    with pytest.raises(ValueError, match="columns must be among"):
        importance_rank(probe, tokens, columns=("importance_entropy",))


def test_importance_vs_ablation_on_known_rankings():
    ctx = dict(backbone="b", layer=-1, probe="ep", seed=0)
    delta = np.array([0.1, 0.0, 0.3, 0.2])
    abl = pd.DataFrame([dict(ctx, predictor=j, delta_acc=d, acc_uniform=0.5) for j, d in enumerate(delta)])
    rising = pd.DataFrame([dict(ctx, predictor=j, importance_acc=2 * d + 1) for j, d in enumerate(delta)])
    falling = rising.assign(importance_acc=-rising["importance_acc"])
    flat = rising.assign(importance_acc=0.0)
    assert importance_vs_ablation(rising, abl).loc[0, "rho"] == pytest.approx(1.0)
    assert importance_vs_ablation(falling, abl).loc[0, "rho"] == pytest.approx(-1.0)
    assert np.isnan(importance_vs_ablation(flat, abl).loc[0, "rho"])
    two = pd.concat([rising, falling.assign(backbone="c")])
    both = importance_vs_ablation(two, pd.concat([abl, abl.assign(backbone="c")]))
    assert both.set_index("backbone")["rho"].to_dict() == pytest.approx({"b": 1.0, "c": -1.0})


def test_join_importance_refuses_mismatched_tables():
    ctx = dict(backbone="b", layer=-1, probe="ep", seed=0)
    abl = pd.DataFrame([dict(ctx, predictor=j, delta_acc=0.1, acc_uniform=0.5) for j in range(4)])
    imp = pd.DataFrame([dict(ctx, predictor=j, importance_acc=0.1) for j in range(3)])
    with pytest.raises(ValueError, match="only one table"):
        join_importance(imp, abl)
    with pytest.raises(ValueError, match="lacks the columns"):
        join_importance(imp.drop(columns="importance_acc"), abl)
    with pytest.raises(ValueError, match="column must be"):
        importance_vs_ablation(imp, abl, column="delta_acc")


# --- token attribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ep", "ep_all", "mhca"])
def test_integrated_gradients_is_complete(tokens, name):
    probe = sharp(name, tokens)
    attr = token_attribution(probe, tokens, n_steps=32, batch_size=25, index=np.arange(60))
    assert attr.attributions.shape == (60, N) and attr.index.tolist() == list(range(60))
    total = attr.attributions.astype(np.float64).sum(-1)
    scale = np.abs(attr.output_diff).max()
    assert scale > 1e-2
    np.testing.assert_allclose(total, attr.output_diff, atol=1e-3 * scale)
    np.testing.assert_allclose(attr.delta, total - attr.output_diff, atol=1e-4 * scale)
    frame = attr.to_frame()
    assert len(frame) == 60 and (frame["relative_delta"] >= 0).all()


def test_mean_token_baseline_of_ep_is_the_all_uniform_probe(tokens):
    probe = sharp("ep", tokens)
    attr = token_attribution(probe, tokens, target="true", index=np.arange(40))
    b = tokens.batch(np.arange(40))
    with torch.no_grad():
        full = probe(b.patch, b.prefix)
        uniform = probe(b.patch, b.prefix, uniform=range(K))
    assert (attr.targets == tokens.labels[:40]).all()
    expected = (full - uniform).gather(1, b.labels[:, None])[:, 0].numpy()
    np.testing.assert_allclose(attr.output_diff, expected, atol=1e-4)


def test_token_attribution_explains_the_prediction_by_default(tokens):
    probe = sharp("ep", tokens)
    attr = token_attribution(probe, tokens, index=np.arange(30), n_steps=8, baseline="zero")
    b = tokens.batch(np.arange(30))
    with torch.no_grad():
        assert (attr.targets == probe(b.patch, b.prefix).argmax(-1).numpy()).all()
    assert not probe.training
    with pytest.raises(ValueError, match="target must be one of"):
        token_attribution(probe, tokens, target="label")
    with pytest.raises(ValueError, match="baseline must be one of"):
        token_attribution(probe, tokens, baseline="blur")


# --- agreement with the attention maps --------------------------------------------------------------


def test_identical_maps_agree_perfectly_and_opposite_ones_do_not():
    rng = np.random.default_rng(1)
    maps = rng.random((5, 3, N))
    mean = maps.mean(1)
    same = attention_agreement(mean, maps, k=4)
    assert same["map"].tolist() == ["mean"] * 5
    np.testing.assert_allclose(same["spearman"], 1.0)
    np.testing.assert_allclose(same["topk_overlap"], 1.0)
    assert (same["chance_overlap"] == 4 / N).all()
    opposite = attention_agreement(-mean, maps, k=4)
    np.testing.assert_allclose(opposite["spearman"], -1.0)
    np.testing.assert_allclose(opposite["topk_overlap"], 0.0)
    assert np.allclose(attention_agreement(-mean, maps, k=4, absolute=True)["spearman"], 1.0)


def test_topk_overlap_counts_shared_tokens():
    a = np.array([[5.0, 4, 3, 2, 1, 0]])
    b = np.array([[5.0, 0, 3, 2, 4, 1]])
    assert topk_overlap(a, b, 3).tolist() == [2 / 3]
    assert topk_overlap(a, a, 6).tolist() == [1.0]


def test_agreement_with_single_predictors_and_constant_maps():
    rng = np.random.default_rng(2)
    maps = rng.random((4, 3, N))
    table = attention_agreement(maps[:, 1], maps, k=2, predictors="all", index=[10, 11, 12, 13], context={"backbone": "x"})
    assert table.groupby("map").size().to_dict() == {"mean": 4, "predictor 0": 4, "predictor 1": 4, "predictor 2": 4}
    assert (table.loc[table["map"] == "predictor 1", "spearman"] == 1.0).all()
    assert sorted(set(table["image"])) == [10, 11, 12, 13] and (table["backbone"] == "x").all()
    flat = attention_agreement(np.ones((4, N)), maps, k=2)
    assert flat["spearman"].isna().all()


def test_agreement_bad_shapes_fail_clearly():
    maps = np.random.default_rng(3).random((4, 3, N))
    with pytest.raises(ValueError, match="same images"):
        attention_agreement(np.zeros((4, N - 1)), maps)
    with pytest.raises(ValueError, match="same images"):
        attention_agreement(np.zeros((5, N)), maps)
    with pytest.raises(ValueError, match=r"\(images, tokens\)"):
        attention_agreement(np.zeros((4, 2, N)), maps)
    with pytest.raises(ValueError, match="k must lie between 1"):
        attention_agreement(np.zeros((4, N)), maps, k=N + 1)
    with pytest.raises(ValueError, match="predictors got 3"):
        attention_agreement(np.zeros((4, N)), maps, predictors=[3])
    with pytest.raises(ValueError, match="finite"):
        attention_agreement(np.full((4, N), np.nan), maps)


def test_attribution_vs_attention_uses_the_plain_maps(tokens):
    probe = sharp("ep", tokens)
    index = np.arange(10, 40)
    result = attribution_vs_attention(probe, tokens, k=4, index=index, n_steps=8, batch_size=7, context={"seed": 3})
    np.testing.assert_allclose(result.maps, collect_attention(probe, tokens, index=index), atol=1e-6)
    assert result.maps.shape == (30, K, N) and result.attribution.attributions.shape == (30, N)
    table = result.table
    assert len(table) == 30 and table["image"].tolist() == index.tolist()
    assert (table["backbone"] == "toy").all() and (table["seed"] == 3).all() and (table["probe"] == "ep").all()
    assert table["spearman"].between(-1, 1).all() and table["topk_overlap"].between(0, 1).all()
    assert {"output_diff", "delta", "target", "label"} <= set(table.columns)
    with pytest.raises(ValueError, match="no attention predictors"):
        attribution_vs_attention(probes.build("gap", D, C), tokens)


@pytest.mark.parametrize("name", ["ep", "mhca"])
def test_integrated_gradients_on_the_linear_part_recover_the_exact_evidence(tokens, name):
    """After pooling, a probe is linear: captum's IG on hook_pooled from the BatchNorm mean gives each pooled
    column exactly W (p - mu) / sigma, and a predictor's columns sum to its evidence over all tokens."""
    from captum.attr import IntegratedGradients

    probe = sharp(name, tokens, **({"heads": 4} if name == "mhca" else {}))
    batch = tokens.batch(np.arange(6))
    with torch.no_grad():
        evidence = probe.evidence(batch.patch, batch.prefix)
        target = probe(batch.patch, batch.prefix).argmax(1)
        pooled = probe.pooled(batch.patch, batch.prefix)
    ig = IntegratedGradients(lambda p: probe.head(probe.norm(p)))  # what follows the pooling
    attributions = ig.attribute(pooled, baselines=probe.norm.running_mean.expand(6, -1), target=target, n_steps=8)
    rows = torch.arange(6)
    per_predictor = evidence.patch.sum(-1) + evidence.other  # (6, C, K): what each predictor adds
    if name == "ep":  # each query owns its slice of the pooled columns
        by_slice = torch.stack([attributions[:, cols].sum(1) for cols in probe.predictor_slices()], dim=1)
        torch.testing.assert_close(by_slice.double(), per_predictor[rows, target].double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        attributions.sum(1).double(), per_predictor[rows, target].sum(-1).double(), atol=1e-4, rtol=0
    )  # all of it: logit - bias
