"""Probes: small heads trained on frozen ViT tokens.

Build one by name::

    probe = epviz.probes.build("ep", dim=768, num_classes=1000, num_queries=32)
    logits = probe(patch_tokens, prefix_tokens)           # (B, C)
    maps = probe.attention(patch_tokens, prefix_tokens)   # (B, K, N), rows sum to 1
    logits_j = probe(patch_tokens, prefix_tokens, uniform=[j])

Every probe is pool -> ``norm`` (BatchNorm1d, affine=False, eps=1e-6) -> ``head``
(Linear); see :class:`~epviz.probes.Probe` for the full interface. A new probe family is
one file: subclass ``Probe``, implement ``_pool`` (and ``num_predictors``), pass raw attention
weights through ``self._route_attention``, and register it with ``@register("name")``; named
variants are data: ``register("ep16", "ep", num_queries=16)``.
"""

from epviz.probes._base import HookPoint, Pooled, Probe, Routed, trainable_params
from epviz.probes._registry import (
    ProbeEntry,
    accepted_options,
    available,
    build,
    entry,
    probe_class,
    probe_specs,
    register,
    standard_set,
    unregister,
)

# Importing the families (one module per family, named after it) fills the registry.
from epviz.probes import (  # noqa: E402,F401  isort: skip
    abmilp,
    aim,
    cae,
    cait,
    cbam,
    clip,
    coca,
    dinovit,
    dolg,
    ep,
    jepa,
    linear,
    mhca,
    siglip,
    simpool,
)

__all__ = [
    "HookPoint",
    "Pooled",
    "Probe",
    "ProbeEntry",
    "Routed",
    "accepted_options",
    "available",
    "build",
    "entry",
    "probe_class",
    "probe_specs",
    "register",
    "standard_set",
    "trainable_params",
    "unregister",
]
