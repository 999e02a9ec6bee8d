"""The Probe base class: attention routing errors and the pooled vector."""

import pytest
import torch

import epviz.probes as probes
from epviz.probes import Pooled
from tests.toy_tokens import OneMapProbe


class _SelfAttention(OneMapProbe):
    """Routes (B, 1, N, N) self-attention; the hook can only observe it."""

    attn_hook_in_path = False

    def _pool(self, patch, prefix, uniform):
        attn = torch.softmax(patch @ patch.transpose(1, 2), dim=-1).unsqueeze(1)  # (B, 1, N, N)
        attn, maps, _ = self._route_attention(attn, uniform)
        return Pooled((attn.squeeze(1) @ patch).mean(dim=1), maps)


class _SelfAttentionInPath(_SelfAttention):
    attn_hook_in_path = True


class _FiveAxes(_SelfAttention):
    def _pool(self, patch, prefix, uniform):
        self._route_attention(torch.ones(1, 1, 1, 1, 1), uniform)


def test_self_attention_routing_makes_every_row_uniform_and_hands_the_hook_the_row_mean():
    patch = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    probe = _SelfAttention(8, 3).eval()
    attn = torch.softmax(patch @ patch.transpose(1, 2), dim=-1)
    assert torch.allclose(probe.attention(patch)[:, 0], attn.mean(dim=1), atol=1e-6)
    assert torch.allclose(probe.pooled(patch, uniform=[0]), patch.mean(dim=1), atol=1e-6)
    handle = probe.hook_attn.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        assert torch.equal(probe.pooled(patch), (attn @ patch).mean(dim=1))
    finally:
        handle.remove()


def test_self_attention_routing_needs_an_observing_hook():
    with pytest.raises(TypeError, match="set the class attribute attn_hook_in_path = False"):
        _SelfAttentionInPath(8, 3)(torch.randn(2, 6, 8))


def test_routing_rejects_other_shapes():
    with pytest.raises(
        ValueError, match=r"attention weights must be \(B, K, L\), \(B, H, N, N\) or \(B, N\); got shape \(1, 1, 1, 1, 1\)"
    ):
        _FiveAxes(8, 3)(torch.randn(2, 6, 8))


def test_pooled_is_what_hook_pooled_sees():
    patch = torch.randn(2, 16, 8)
    probe = probes.build("gap", 8, 3).eval()
    seen = []
    handle = probe.hook_pooled.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        logits = probe(patch)
    finally:
        handle.remove()
    assert torch.equal(seen[0], probe.pooled(patch)) and torch.equal(seen[0], patch.mean(dim=1))
    assert torch.equal(logits, probe.head(probe.norm(probe.pooled(patch))))
