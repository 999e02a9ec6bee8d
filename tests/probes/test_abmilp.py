"""abmilp: attention-based MIL pooling against its equations."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_abmilp_matches_its_equations():
    x = patch_tokens()
    probe = probes.build("abmilp", 64, 5, seed=0).eval()
    q, k, v = probe.qkv(x).chunk(3, dim=-1)
    s = probe.proj(torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v)
    a = torch.softmax(probe.scorer(s).squeeze(-1), dim=-1)
    assert torch.allclose(probe.pooled(x), torch.einsum("bn,bnd->bd", a, s), atol=1e-5)
    assert torch.allclose(probe.attention(x)[:, 0], a, atol=1e-6)
    assert torch.allclose(probe.pooled(x, uniform=[0]), s.mean(1), atol=1e-5)
