"""siglip: timm's AttentionPoolLatent, run with explicit weights."""

import torch
from timm.layers import AttentionPoolLatent

import epviz.probes as probes


def tokens(b=3, n=16, d=64, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_siglip_is_timms_attention_pool_latent():
    x = tokens()
    probe = probes.build("siglip", 64, 5, seed=0).eval()
    assert isinstance(probe.attn_pool, AttentionPoolLatent)
    with torch.no_grad():
        expected = AttentionPoolLatent.forward(probe.attn_pool, x)  # timm's own (fused) forward
        assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
