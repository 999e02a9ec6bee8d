"""dolg: DOLG's local branch against its equations; uniform is the mean weight."""

import math

import torch
from torch.nn import functional as F

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_dolg_matches_its_equations_and_uniform_is_the_mean_weight():
    x = patch_tokens()
    probe = probes.build("dolg", 64, 5, seed=0).eval()
    h = probe.bn(probe.conv1(x).transpose(1, 2)).transpose(1, 2)
    w = F.softplus(probe.conv2(F.relu(h))).squeeze(-1)
    f = F.normalize(h, dim=-1)
    assert torch.allclose(probe.pooled(x), (w.unsqueeze(-1) * f).mean(1), atol=1e-6)
    assert torch.allclose(probe.attention(x)[:, 0], w / w.sum(1, keepdim=True), atol=1e-6)
    flat = w.mean(1, keepdim=True).expand_as(w)
    assert torch.allclose(probe.pooled(x, uniform=[0]), (flat.unsqueeze(-1) * f).mean(1), atol=1e-6)


def test_both_1x1_convolutions_start_as_in_the_reference():
    # the reference's ResNet-style init: weight ~ N(0, 2 / fan_out), fan_out = output channels; biases untouched
    d = 768
    probe = probes.build("dolg", d, 10, seed=0)
    assert abs(probe.conv1.weight.std().item() / math.sqrt(2 / d) - 1) < 0.02  # 589,824 draws
    assert abs(probe.conv2.weight.std().item() / math.sqrt(2.0) - 1) < 0.1  # 768 draws; PyTorch's default is 68x smaller
    assert abs(probe.conv1.weight.mean().item()) < 1e-3
    for bias in (probe.conv1.bias, probe.conv2.bias):  # PyTorch's default U(-1/sqrt(D), 1/sqrt(D))
        assert bias.abs().max() <= d**-0.5 and bias.abs().max() > 0
    assert sorted(probe.state_dict()) == sorted(
        [
            "conv1.weight",
            "conv1.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "bn.num_batches_tracked",
            "conv2.weight",
            "conv2.bias",
            "norm.running_mean",
            "norm.running_var",
            "norm.num_batches_tracked",
            "head.weight",
            "head.bias",
        ]
    )


def test_the_map_at_init_is_not_uniform():
    x = patch_tokens(b=8, n=196, d=768)
    entropies = []
    for seed in range(5):
        p = probes.build("dolg", 768, 10, seed=seed).eval().attention(x)[:, 0]
        entropies.append((-(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(196)).mean().item())  # 0 log 0 = 0
    assert max(entropies) < 0.97 and sum(entropies) / 5 < 0.9  # a 68x smaller conv2 gives 0.998 (uniform)
