"""cae: CAE's attentive block against its equations."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_cae_matches_its_equations():
    x = patch_tokens(n=20)
    probe = probes.build("cae", 64, 5, heads=8, seed=0).eval()
    q = probe.q(probe.norm_q(probe.query)).view(8, 8)
    k = probe.k(probe.norm_k(x)).view(3, 20, 8, 8)
    v = probe.v(probe.norm_v(x)).view(3, 20, 8, 8)
    attn = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / 8**0.5, dim=-1)
    expected = probe.proj(torch.einsum("bhn,bnhd->bhd", attn, v).reshape(3, 64))
    assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
    assert probe.q.bias is None and probe.proj.bias is not None
