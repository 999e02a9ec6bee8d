"""mhca: against torch.nn.MultiheadAttention; default head counts."""

import pytest
import torch
from torch import nn

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_mhca_equals_torch_multihead_attention(bias, heads):
    x = patch_tokens(n=20)
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
    assert torch.allclose(probe.pooled(x), out[:, 0], atol=1e-5)
    assert torch.allclose(probe.attention(x), weights[:, :, 0], atol=1e-6)


def test_mhca_default_heads_scale_with_dim():
    assert probes.build("mhca", 768, 10).heads == 12
    assert probes.build("mhca", 384, 10).heads == 6
    assert probes.build("mhca", 1024, 10).heads == 16
    assert probes.build("mhca", 64, 10).heads == 1
    assert probes.build("mhca", 768, 10).config["heads"] == 12
