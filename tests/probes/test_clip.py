"""clip: token 0 of CLIP's AttentionPool2d against the full self-attention."""

import pytest
import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_clip_token_zero_equals_full_self_attention():
    x = patch_tokens()
    probe = probes.build("clip", 64, 5, grid=(4, 4), seed=0).eval()
    h = probe.heads
    z = probe.token_norm(x)
    z = torch.cat([z.mean(1, keepdim=True), z], dim=1) + probe.pos_embed
    q, k, v = probe.qkv(z).view(3, 17, 3, h, 64 // h).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / (64 // h) ** 0.5, dim=-1)  # (B, H, 17, 17)
    out = probe.proj((attn @ v).transpose(1, 2).reshape(3, 17, 64))[:, 0]
    assert torch.allclose(probe.pooled(x), out, atol=1e-5)
    row = attn[:, :, 0, 1:]
    assert torch.allclose(probe.attention(x), row / row.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(probe.nonpatch_mass(x), attn[:, :, 0, 0], atol=1e-6)


def test_clip_token_count_comes_from_options_and_is_checked():
    assert probes.build("clip", 64, 5).num_tokens == 196
    assert probes.build("clip", 64, 5, grid=(3, 5)).num_tokens == 15
    assert probes.build("clip", 64, 5, num_tokens=16).pos_embed.shape == (17, 64)
    with pytest.raises(ValueError, match=r"built for 196 patch tokens .* got 16; build it with num_tokens=16"):
        probes.build("clip", 64, 5)(patch_tokens())
    with pytest.raises(ValueError, match="grid"):
        probes.build("clip", 64, 5, grid=(4, 4), num_tokens=15)
