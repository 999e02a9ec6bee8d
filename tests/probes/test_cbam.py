"""cbam: CBAM pooling against its equations; uniform is the mean weight; the grid."""

import pytest
import torch
from torch.nn import functional as F

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_cbam_matches_its_equations_and_uniform_is_the_mean_weight():
    x = patch_tokens(n=12)
    probe = probes.build("cbam", 64, 5, grid=(3, 4), seed=0).eval()
    fmap = x.transpose(1, 2).reshape(3, 64, 3, 4)  # row-major grid
    mlp = lambda z: probe.fc2(F.relu(probe.fc1(z)))  # noqa: E731
    gate = torch.sigmoid(mlp(fmap.mean((2, 3))) + mlp(fmap.amax((2, 3))))[:, :, None, None]
    y = fmap * gate
    s = torch.sigmoid(probe.conv_bn(probe.conv(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1))))
    expected = F.relu(y * s + fmap).mean((2, 3))
    assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
    s = s.view(3, 12)
    assert torch.allclose(probe.attention(x)[:, 0], s / s.sum(1, keepdim=True), atol=1e-6)
    flat = s.mean(1)[:, None, None, None]
    assert torch.allclose(probe.pooled(x, uniform=0), F.relu(y * flat + fmap).mean((2, 3)), atol=1e-5)
    assert probe.fc1.out_features == 4  # 64 / 16


def test_cbam_grid_comes_from_square_token_counts_or_the_option():
    probe = probes.build("cbam", 64, 5)
    assert probe(patch_tokens(n=16)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"12 tokens is not a square, so pass grid=\(rows, cols\)"):
        probe(patch_tokens(n=12))
    with pytest.raises(ValueError, match=r"built for a 3x4 grid \(12 tokens\) but got 16"):
        probes.build("cbam", 64, 5, grid=(3, 4))(patch_tokens(n=16))
