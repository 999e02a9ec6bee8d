"""Block-based poolers against independent computations: siglip, clip, cait, dinovit, jepa."""

import pytest
import torch
from timm.layers import AttentionPoolLatent
from torch.nn import functional as F

import epviz.probes as probes



def tokens(b=3, n=16, d=64, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_siglip_is_timms_attention_pool_latent():
    x = tokens()
    probe = probes.build("siglip", 64, 5, seed=0).eval()
    assert isinstance(probe.attn_pool, AttentionPoolLatent)
    with torch.no_grad():
        expected = AttentionPoolLatent.forward(probe.attn_pool, x)  # timm's own (fused) forward
        assert torch.allclose(probe.features(x), expected, atol=1e-5)


def test_clip_token_zero_equals_full_self_attention():
    x = tokens()
    probe = probes.build("clip", 64, 5, grid=(4, 4), seed=0).eval()
    h = probe.heads
    z = probe.token_norm(x)
    z = torch.cat([z.mean(1, keepdim=True), z], dim=1) + probe.pos_embed
    q, k, v = probe.qkv(z).view(3, 17, 3, h, 64 // h).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / (64 // h) ** 0.5, dim=-1)  # (B, H, 17, 17)
    out = probe.proj((attn @ v).transpose(1, 2).reshape(3, 17, 64))[:, 0]
    assert torch.allclose(probe.features(x), out, atol=1e-5)
    row = attn[:, :, 0, 1:]
    assert torch.allclose(probe.attention(x), row / row.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(probe.nonpatch_mass(x), attn[:, :, 0, 0], atol=1e-6)


def test_clip_token_count_comes_from_options_and_is_checked():
    assert probes.build("clip", 64, 5).num_tokens == 196
    assert probes.build("clip", 64, 5, grid=(3, 5)).num_tokens == 15
    assert probes.build("clip", 64, 5, num_tokens=16).pos_embed.shape == (17, 64)
    with pytest.raises(ValueError, match=r"built for 196 patch tokens .* got 16; build it with num_tokens=16"):
        probes.build("clip", 64, 5)(tokens())
    with pytest.raises(ValueError, match="grid"):
        probes.build("clip", 64, 5, grid=(4, 4), num_tokens=15)


def test_cait_matches_its_equations():
    x = tokens()
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
    assert torch.allclose(probe.features(x), probe.final_norm(c), atol=1e-5)
    assert torch.allclose(probe.gamma1, torch.full((64,), 1e-5))


def test_dinovit_maps_average_the_query_rows():
    x = tokens()
    probe = probes.build("dinovit", 64, 5, seed=0).eval()
    h = probe.heads
    q, k, _ = probe.qkv(probe.norm1(x)).view(3, 16, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / (64 // h) ** 0.5, dim=-1)
    assert torch.allclose(probe.attention(x), attn.mean(dim=2), atol=1e-6)
    assert not probe.attn_hook_in_path


def test_jepa_matches_its_equations():
    x = tokens()
    probe = probes.build("jepa", 64, 5, heads=4, seed=0).eval()
    k, v = probe.kv(probe.norm1(x)).chunk(2, dim=-1)
    q = probe.q(probe.query)
    out = F.scaled_dot_product_attention(
        q.view(1, 1, 4, 16).transpose(1, 2).expand(3, -1, -1, -1), k.view(3, 16, 4, 16).transpose(1, 2), v.view(3, 16, 4, 16).transpose(1, 2)
    ).transpose(1, 2).reshape(3, 64)
    hidden = probe.query + probe.proj(out)
    assert torch.allclose(probe.features(x), hidden + probe.mlp(probe.norm2(hidden)), atol=1e-5)
