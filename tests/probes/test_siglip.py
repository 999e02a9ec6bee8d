"""siglip: timm's AttentionPoolLatent, run with explicit weights."""

import torch
from timm.layers import AttentionPoolLatent

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_siglip_is_timms_attention_pool_latent():
    x = patch_tokens()
    probe = probes.build("siglip", 64, 5, seed=0).eval()
    assert isinstance(probe.attn_pool, AttentionPoolLatent)
    with torch.no_grad():
        expected = AttentionPoolLatent.forward(probe.attn_pool, x)  # timm's own (fused) forward
        assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
