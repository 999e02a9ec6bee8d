"""aim: AIM's attention-pooling classifier against its equations."""

import torch
from torch.nn import functional as F

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_aim_matches_its_equations():
    x = patch_tokens(n=20)
    probe = probes.build("aim", 64, 5, heads=4, seed=0).train()
    xn = F.batch_norm(x.transpose(1, 2), None, None, training=True, eps=1e-6).transpose(1, 2)
    k, v = probe.k(xn).view(3, 20, 4, 16), probe.v(xn).view(3, 20, 4, 16)
    q = probe.query.view(4, 16)
    attn = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhn,bnhd->bhd", attn, v).reshape(3, 64)
    assert torch.allclose(probe.pooled(x), expected, atol=1e-5)
    assert probe.predictor_slices()[1] == slice(16, 32)
