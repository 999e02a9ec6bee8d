"""dolg: DOLG's local branch against its equations; uniform is the mean weight."""

import torch
from torch.nn import functional as F

import epviz.probes as probes


def tokens(b=3, n=16, d=64, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_dolg_matches_its_equations_and_uniform_is_the_mean_weight():
    x = tokens()
    probe = probes.build("dolg", 64, 5, seed=0).eval()
    h = probe.bn(probe.conv1(x).transpose(1, 2)).transpose(1, 2)
    w = F.softplus(probe.conv2(F.relu(h))).squeeze(-1)
    f = F.normalize(h, dim=-1)
    assert torch.allclose(probe.pooled(x), (w.unsqueeze(-1) * f).mean(1), atol=1e-6)
    assert torch.allclose(probe.attention(x)[:, 0], w / w.sum(1, keepdim=True), atol=1e-6)
    flat = w.mean(1, keepdim=True).expand_as(w)
    assert torch.allclose(probe.pooled(x, uniform=[0]), (flat.unsqueeze(-1) * f).mean(1), atol=1e-6)
