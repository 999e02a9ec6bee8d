"""dinovit: one ViT block; maps average the self-attention over query rows."""

import torch

import epviz.probes as probes
from tests.toy_tokens import patch_tokens


def test_dinovit_maps_average_the_query_rows():
    x = patch_tokens()
    probe = probes.build("dinovit", 64, 5, seed=0).eval()
    h = probe.heads
    q, k, _ = probe.qkv(probe.norm1(x)).view(3, 16, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / (64 // h) ** 0.5, dim=-1)
    assert torch.allclose(probe.attention(x), attn.mean(dim=2), atol=1e-6)
    assert not probe.attn_hook_in_path
