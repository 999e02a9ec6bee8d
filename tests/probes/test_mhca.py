"""Cross-attention poolers against independent computations: mhca, aim, cae, coca."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import epviz.probes as probes



def tokens(b=3, n=20, d=64, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_mhca_equals_torch_multihead_attention(bias, heads):
    x = tokens()
    probe = probes.build("mhca", 64, 5, heads=heads, bias=bias, seed=0).eval()
    mha = nn.MultiheadAttention(64, heads, bias=bias, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([probe.q_proj.weight, probe.k_proj.weight, probe.v_proj.weight]))
        mha.out_proj.weight.copy_(probe.out_proj.weight)
        if bias:
            mha.in_proj_bias.copy_(torch.cat([probe.q_proj.bias, probe.k_proj.bias, probe.v_proj.bias]))
            mha.out_proj.bias.copy_(probe.out_proj.bias)
    query = probe.query.expand(3, 1, 64)
    out, weights = mha(query, x, x, need_weights=True, average_attn_weights=False)
    assert torch.allclose(probe.features(x), out[:, 0], atol=1e-5)
    assert torch.allclose(probe.attention(x), weights[:, :, 0], atol=1e-6)


def test_mhca_default_heads_scale_with_dim():
    assert probes.build("mhca", 768, 10).heads == 12
    assert probes.build("mhca", 384, 10).heads == 6
    assert probes.build("mhca", 1024, 10).heads == 16
    assert probes.build("mhca", 64, 10).heads == 1
    assert probes.build("mhca", 768, 10).config["heads"] == 12


def test_aim_matches_its_equations():
    x = tokens()
    probe = probes.build("aim", 64, 5, heads=4, seed=0).train()
    xn = F.batch_norm(x.transpose(1, 2), None, None, training=True, eps=1e-6).transpose(1, 2)
    k, v = probe.k(xn).view(3, 20, 4, 16), probe.v(xn).view(3, 20, 4, 16)
    q = probe.query.view(4, 16)
    attn = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhn,bnhd->bhd", attn, v).reshape(3, 64)
    assert torch.allclose(probe.features(x), expected, atol=1e-5)
    assert probe.predictor_slices()[1] == slice(16, 32)


def test_cae_matches_its_equations():
    x = tokens()
    probe = probes.build("cae", 64, 5, heads=8, seed=0).eval()
    q = probe.q(probe.norm_q(probe.query)).view(8, 8)
    k = probe.k(probe.norm_k(x)).view(3, 20, 8, 8)
    v = probe.v(probe.norm_v(x)).view(3, 20, 8, 8)
    attn = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / 8**0.5, dim=-1)
    expected = probe.proj(torch.einsum("bhn,bnhd->bhd", attn, v).reshape(3, 64))
    assert torch.allclose(probe.features(x), expected, atol=1e-5)
    assert probe.q.bias is None and probe.proj.bias is not None


def test_coca_first_query_equals_the_full_pooler():
    """Computing only query 0 gives what the reference's all-queries pooler returns at index 0."""
    x = tokens()
    probe = probes.build("coca", 64, 5, heads=8, dim_head=16, num_queries=10, seed=0).eval()
    q = probe.to_q(probe.query_norm(probe.queries)).view(10, 8, 16).transpose(0, 1)  # (H, Q, d)
    k, v = probe.to_kv(x).chunk(2, dim=-1)  # (B, N, d): one head shared by all query heads
    attn = torch.softmax(torch.einsum("hqd,bnd->bhqn", q, k) / 4.0, dim=-1)
    out = probe.to_out(torch.einsum("bhqn,bnd->bqhd", attn, v).reshape(3, 10, 128))
    assert torch.allclose(probe.features(x), out[:, 0], atol=1e-5)
    assert torch.allclose(probe.attention(x), attn[:, :, 0], atol=1e-6)
    assert probe.query_norm.bias is None


@pytest.mark.parametrize("name", ["mhca", "aim", "cae", "jepa", "siglip", "cait", "dinovit", "clip", "esimpool", "simpool"])
def test_heads_option_is_validated(name):
    with pytest.raises(ValueError, match=r"heads=5 must divide the token width D=64; valid choices include \[1, 2, 4, 8, 16, 32, 64\]"):
        probes.build(name, 64, 5, heads=5)
