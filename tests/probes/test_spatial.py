"""Spatial-map poolers (dolg, cbam) and the GAP-query / MIL poolers (simpool, esimpool, abmilp)."""

import pytest
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
    assert torch.allclose(probe.features(x), (w.unsqueeze(-1) * f).mean(1), atol=1e-6)
    assert torch.allclose(probe.attention(x)[:, 0], w / w.sum(1, keepdim=True), atol=1e-6)
    flat = w.mean(1, keepdim=True).expand_as(w)
    assert torch.allclose(probe.features(x, uniform=[0]), (flat.unsqueeze(-1) * f).mean(1), atol=1e-6)


def test_cbam_matches_its_equations_and_uniform_is_the_mean_weight():
    x = tokens(n=12)
    probe = probes.build("cbam", 64, 5, grid=(3, 4), seed=0).eval()
    fmap = x.transpose(1, 2).reshape(3, 64, 3, 4)  # row-major grid
    mlp = lambda z: probe.fc2(F.relu(probe.fc1(z)))  # noqa: E731
    gate = torch.sigmoid(mlp(fmap.mean((2, 3))) + mlp(fmap.amax((2, 3))))[:, :, None, None]
    y = fmap * gate
    s = torch.sigmoid(probe.conv_bn(probe.conv(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1))))
    expected = F.relu(y * s + fmap).mean((2, 3))
    assert torch.allclose(probe.features(x), expected, atol=1e-5)
    s = s.view(3, 12)
    assert torch.allclose(probe.attention(x)[:, 0], s / s.sum(1, keepdim=True), atol=1e-6)
    flat = s.mean(1)[:, None, None, None]
    assert torch.allclose(probe.features(x, uniform=0), F.relu(y * flat + fmap).mean((2, 3)), atol=1e-5)
    assert probe.fc1.out_features == 4  # 64 / 16


def test_cbam_grid_comes_from_square_token_counts_or_the_option():
    probe = probes.build("cbam", 64, 5)
    assert probe(tokens(n=16)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"12 tokens is not a square, so pass grid=\(rows, cols\)"):
        probe(tokens(n=12))
    with pytest.raises(ValueError, match=r"built for a 3x4 grid \(12 tokens\) but got 16"):
        probes.build("cbam", 64, 5, grid=(3, 4))(tokens(n=16))


def test_simpool_matches_its_equations():
    x = tokens()
    probe = probes.build("simpool", 64, 5, seed=0).eval()
    xn = probe.token_norm(x)
    q, k = probe.wq(x.mean(1)), probe.wk(xn)
    attn = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / 8.0, dim=-1)
    assert torch.allclose(probe.features(x), torch.einsum("bn,bnd->bd", attn, xn), atol=1e-5)
    assert probe.heads == 1


def test_esimpool_has_no_linear_layers():
    x = tokens()
    probe = probes.build("esimpool", 64, 5, heads=4, seed=0).eval()
    assert [n for n, _ in probe.named_parameters()] == ["token_norm.weight", "token_norm.bias", "head.weight", "head.bias"]
    q = probe.token_norm(x.mean(1)).view(3, 4, 16)
    k = probe.token_norm(x).view(3, 16, 4, 16)
    attn = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhn,bnhd->bhd", attn, x.view(3, 16, 4, 16)).reshape(3, 64)
    assert torch.allclose(probe.features(x), expected, atol=1e-5)


def test_abmilp_matches_its_equations():
    x = tokens()
    probe = probes.build("abmilp", 64, 5, seed=0).eval()
    q, k, v = probe.qkv(x).chunk(3, dim=-1)
    s = probe.proj(torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v)
    a = torch.softmax(probe.scorer(s).squeeze(-1), dim=-1)
    assert torch.allclose(probe.features(x), torch.einsum("bn,bnd->bd", a, s), atol=1e-5)
    assert torch.allclose(probe.attention(x)[:, 0], a, atol=1e-6)
    assert torch.allclose(probe.features(x, uniform=[0]), s.mean(1), atol=1e-5)
