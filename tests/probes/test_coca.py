"""coca: computing query 0 only equals the full attentional pooler."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_coca_first_query_equals_the_full_pooler():
    """Computing only query 0 gives what the reference's all-queries pooler returns at index 0."""
    x = patch_tokens(n=20)
    probe = probes.build("coca", 64, 5, heads=8, dim_head=16, num_queries=10, seed=0).eval()
    q = probe.to_q(probe.query_norm(probe.queries)).view(10, 8, 16).transpose(0, 1)  # (H, Q, d)
    k, v = probe.to_kv(x).chunk(2, dim=-1)  # (B, N, d): one head shared by all query heads
    attn = torch.softmax(torch.einsum("hqd,bnd->bhqn", q, k) / 4.0, dim=-1)
    out = probe.to_out(torch.einsum("bhqn,bnd->bqhd", attn, v).reshape(3, 10, 128))
    assert torch.allclose(probe.pooled(x), out[:, 0], atol=1e-5)
    assert torch.allclose(probe.attention(x), attn[:, :, 0], atol=1e-6)
    assert probe.query_norm.bias is None
