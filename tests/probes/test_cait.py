"""cait: one class-attention block against its equations."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_cait_matches_its_equations():
    x = patch_tokens()
    probe = probes.build("cait", 64, 5, seed=0).eval()
    h = probe.heads
    c = probe.query.expand(3, 1, 64)
    u = probe.norm1(torch.cat([c, x], dim=1))
    q = probe.q(u[:, :1]).view(3, 1, h, -1).transpose(1, 2)
    k = probe.k(u).view(3, 17, h, -1).transpose(1, 2)
    v = probe.v(u).view(3, 17, h, -1).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) / (64 // h) ** 0.5, dim=-1)
    c = c[:, 0] + probe.gamma1 * probe.proj((attn @ v).transpose(1, 2).reshape(3, 64))
    c = c + probe.gamma2 * probe.mlp(probe.norm2(c))
    assert torch.allclose(probe.pooled(x), probe.final_norm(c), atol=1e-5)
    assert torch.allclose(probe.gamma1, torch.full((64,), 1e-5))
