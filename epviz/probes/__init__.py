"""Probes: small heads trained on frozen ViT tokens.

Build one by name::

    probe = epviz.probes.build("ep", dim=768, num_classes=1000, num_queries=32)
    logits = probe(patch_tokens, prefix_tokens)           # (B, C)
    maps = probe.attention(patch_tokens, prefix_tokens)   # (B, K, N), rows sum to 1
    logits_j = probe(patch_tokens, prefix_tokens, uniform=[j])

Every probe is pool -> ``norm`` (BatchNorm1d, affine=False, eps=1e-6) -> ``head``
(Linear); see :class:`~epviz.probes.base.Probe` for the full interface. New probe
families subclass ``Probe`` and register with ``@register("name")``.
"""

from epviz.probes.base import HookPoint, Pooled, Probe
from epviz.probes.registry import available, build, probe_class, register

# Importing the families fills the registry.
from epviz.probes import abmilp, blocks, ep, linear, mhca, simpool, spatial  # noqa: E402,F401  isort: skip

__all__ = ["HookPoint", "Pooled", "Probe", "available", "build", "probe_class", "register"]
