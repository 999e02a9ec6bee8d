"""jepa: V-JEPA's attentive pooler against scaled_dot_product_attention."""

import torch
from torch.nn import functional as F

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_jepa_matches_its_equations():
    x = patch_tokens()
    probe = probes.build("jepa", 64, 5, heads=4, seed=0).eval()
    k, v = probe.kv(probe.norm1(x)).chunk(2, dim=-1)
    q = probe.q(probe.query)
    out = (
        F.scaled_dot_product_attention(
            q.view(1, 1, 4, 16).transpose(1, 2).expand(3, -1, -1, -1),
            k.view(3, 16, 4, 16).transpose(1, 2),
            v.view(3, 16, 4, 16).transpose(1, 2),
        )
        .transpose(1, 2)
        .reshape(3, 64)
    )
    hidden = probe.query + probe.proj(out)
    assert torch.allclose(probe.pooled(x), hidden + probe.mlp(probe.norm2(hidden)), atol=1e-5)
