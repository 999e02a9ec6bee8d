"""simpool and esimpool: the GAP vector as the query."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_simpool_matches_its_equations():
    x = patch_tokens()
    probe = probes.build("simpool", 64, 5, seed=0).eval()
    xn = probe.token_norm(x)
    q, k = probe.wq(x.mean(1)), probe.wk(xn)
    attn = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / 8.0, dim=-1)
    assert torch.allclose(probe.pooled(x), torch.einsum("bn,bnd->bd", attn, xn), atol=1e-5)
    assert probe.heads == 1


def test_esimpool_has_no_linear_layers():
    x = patch_tokens()
    probe = probes.build("esimpool", 64, 5, heads=4, seed=0).eval()
    assert [n for n, _ in probe.named_parameters()] == ["token_norm.weight", "token_norm.bias", "head.weight", "head.bias"]
    q = probe.token_norm(x.mean(1)).view(3, 4, 16)
    k = probe.token_norm(x).view(3, 16, 4, 16)
    attn = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhn,bnhd->bhd", attn, x.view(3, 16, 4, 16)).reshape(3, 64)
    assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
