"""Efficiency: FlopCounterMode's convention, EP's hand-counted FLOPs, parameters, throughput."""

import inspect

import pytest
import torch

import epviz.probes as probes
from epviz.analysis import backbone_flops, count_flops, efficiency, probe_costs, probe_flops, throughput
from epviz.probes import trainable_params


def test_flop_counter_counts_two_per_multiply_add():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    x, y = torch.randn(2, 3, 5), torch.randn(2, 5, 4)
    assert count_flops(lambda: torch.bmm(x, y)) == 2 * 2 * 3 * 5 * 4
    assert count_flops(lambda: a.softmax(-1) + 1) == 0  # element-wise work is not counted


@pytest.mark.parametrize("m,d_out", [(4, 1), (8, 2), (16, 1)])
def test_ep_flops_match_the_fast_form_hand_count(m, d_out):
    d, c, n = 64, 10, 49
    d_o = d // d_out
    probe = probes.build("ep", d, c, num_queries=m, d_out=d_out)
    macs = m * n * d + m * n * d + m * d * (d_o // m) + d_o * c  # logits, pooling, projection, classifier
    assert probe_flops(probe, n, num_prefix=0, device="cpu") == 2 * macs
    # the fast form costs less than the direct one (project every token first)
    direct_macs = m * n * d + n * d * d_o + n * d_o + d_o * c
    assert 2 * macs < 2 * direct_macs


def test_linear_probes_cost_only_the_classifier():
    for name in ("cls", "gap"):
        assert probe_flops(probes.build(name, 64, 10), 49, num_prefix=1, device="cpu") == 2 * 64 * 10


def test_parameter_counts():
    d, c, m = 64, 10, 4
    df = efficiency(
        [probes.build("ep", d, c, num_queries=m), probes.build("gap", d, c)],
        num_tokens=16,
        measure_speed=False,
        device="cpu",
        context={"backbone": "toy"},
    )
    ep, gap = df.iloc[0], df.iloc[1]
    assert ep["params"] == m * d + d * d + d * c + c and ep["pool_params"] == m * d + d * d
    assert gap["params"] == d * c + c and gap["pool_params"] == 0
    assert df["probe"].tolist() == ["ep", "gap"] and (df["backbone"] == "toy").all()
    assert df["throughput"].isna().all() and df["backbone_flops"].isna().all()


def test_with_a_backbone(test_vit_backbone):
    bb = test_vit_backbone
    probe = probes.build("ep", bb.dim, 10, num_queries=8)
    df = efficiency({"ep-M8": probe}, backbone=bb, batch_size=8, repeats=2, device="cpu")
    row = df.iloc[0]
    assert row["probe"] == "ep-M8" and row["num_tokens"] == bb.num_patches and row["num_prefix"] == bb.num_prefix_tokens
    assert row["backbone_flops"] == backbone_flops(bb)
    assert row["total_flops"] == row["flops"] + row["backbone_flops"]
    # hand count: patch embedding, then per block qkv, attention (QK^T and AV), projection, MLP
    n, d, p = bb.num_patches + bb.num_prefix_tokens, bb.dim, bb.model.patch_embed.proj.kernel_size[0]
    hidden = bb.model.blocks[0].mlp.fc1.out_features
    macs = bb.num_patches * 3 * p * p * d + bb.depth * (n * 3 * d * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden)
    assert row["backbone_flops"] == 2 * macs  # the fused attention kernel is counted too
    assert row["throughput"] > 0 and row["gflops"] == pytest.approx(row["flops"] / 1e9)


def test_throughput_and_params_helpers():
    probe = probes.build("mhca", 32, 5)
    assert throughput(probe, 16, batch_size=4, repeats=2, device="cpu") > 0
    assert trainable_params(probe) == sum(p.numel() for p in probe.parameters())
    probe.head.weight.requires_grad_(False)
    assert trainable_params(probe) == sum(p.numel() for p in probe.parameters()) - probe.head.weight.numel()


def test_needs_a_token_count():
    with pytest.raises(ValueError, match="num_tokens"):
        efficiency(probes.build("gap", 32, 5), measure_speed=False)
    with pytest.raises(TypeError, match="Probes"):
        efficiency([torch.nn.Linear(2, 2)], num_tokens=4)


@pytest.mark.parametrize("name", probes.available())
def test_every_probe_can_be_counted(name):
    # coca and siglip feed views of their learned queries into submodules: counting must not trip on them
    options = {"num_queries": 4} if name in ("ep", "ep_all") else {}
    if "grid" in inspect.signature(probes.probe_class(name).__init__).parameters:
        options["grid"] = (4, 4)
    probe = probes.build(name, 64, 5, **options)
    df = efficiency({name: probe}, num_tokens=16, num_prefix=1, measure_speed=False, device="cpu")
    assert df.loc[0, "flops"] > 0 and df.loc[0, "params"] == trainable_params(probe)


def test_probe_costs_rank_ep_below_mhca(test_vit_backbone):
    costs = probe_costs(["cls", "ep16", "mhca"], test_vit_backbone, 10)
    assert list(costs["probe"]) == ["cls", "ep16", "mhca"] and (costs["backbone"] == "test_vit").all()
    cost = costs.set_index("probe")
    d, c = test_vit_backbone.dim, 10
    assert cost.loc["cls", "params"] == d * c + c
    assert cost.loc["ep16", "pool_params"] == 16 * d + d * d
    assert cost.loc["ep16", "flops"] < cost.loc["mhca", "flops"]
    assert (cost["backbone_flops"] > 0).all() and cost["throughput"].isna().all()
