"""The probe registry: families (classes) and named variants (a family with fixed options), and `build`.

A family registers with the class decorator ``@register("mhca")``; a variant is data,
``register("ep16", "ep", num_queries=16)``, like timm's model entrypoints. Every list of probes
(the notebooks' probe sets, the Explorer, the contract tests) comes from here.

Capabilities are declared by each family as class attributes (``attentive``: it has attention
predictors; ``sliced``: each predictor alone produces its own columns of the pooled feature),
so ``available(attentive=True)`` needs no probe to be built.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from epviz.probes._base import Probe

__all__ = [
    "ProbeEntry",
    "accepted_options",
    "available",
    "build",
    "entry",
    "probe_class",
    "probe_specs",
    "register",
    "standard_set",
    "unregister",
]


@dataclass(frozen=True)
class ProbeEntry:
    """One registered name.

    Attributes:
        name: The registered name.
        family: The probe class it builds.
        options: Build options fixed by the name (empty for a family).
        standard: Whether the name stands for its family in :func:`standard_set`.
    """

    name: str
    family: type[Probe]
    options: Mapping[str, Any] = field(default_factory=dict)
    standard: bool = False

    @property
    def is_variant(self) -> bool:
        """Whether the name is a variant (a family with fixed options)."""
        return self.name != self.family.name


_REGISTRY: dict[str, ProbeEntry] = {}


@overload
def register(name: str) -> Callable[[type[Probe]], type[Probe]]: ...
@overload
def register(name: str, family: str | type[Probe], *, standard: bool = False, **options: Any) -> ProbeEntry: ...


def register(
    name: str, family: str | type[Probe] | None = None, *, standard: bool = False, **options: Any
) -> Callable[[type[Probe]], type[Probe]] | ProbeEntry:
    """Register a probe family (as a class decorator) or a named variant of one.

    Args:
        name: The name to register.
        family: For a variant: the family's registered name or class. None: decorate a family class.
        standard: A variant that stands for its family in :func:`standard_set` (e.g. EP with the
            query count the zoo comparisons use).
        **options: The variant's fixed build options (checked against the family's signature).

    Raises:
        ValueError: The name is taken, or a variant's options are not the family's.
    """
    if name in _REGISTRY:
        raise ValueError(f"a probe named {name!r} is already registered ({_REGISTRY[name].family.__name__})")
    if family is None:
        if options or standard:
            raise ValueError("options and standard= are for variants: register(name, family, **options)")

        def add(cls: type[Probe]) -> type[Probe]:
            if name in _REGISTRY:
                raise ValueError(f"a probe named {name!r} is already registered ({_REGISTRY[name].family.__name__})")
            cls.name = name
            _REGISTRY[name] = ProbeEntry(name, cls)
            return cls

        return add
    cls = family if isinstance(family, type) else probe_class(family)
    unknown = sorted(set(options) - _accepted(cls))
    if unknown:
        raise ValueError(
            f"variant {name!r}: family {cls.name!r} does not take option(s) {unknown}; it accepts {sorted(_accepted(cls))}"
        )
    added = ProbeEntry(name, cls, dict(options), bool(standard))
    _REGISTRY[name] = added
    return added


def unregister(name: str) -> ProbeEntry:
    """Remove a registered name (e.g. a family defined in a notebook cell that is run again).

    Args:
        name: A registered family or variant; a family's variants must be removed first.

    Returns:
        The removed entry.

    Raises:
        ValueError: The name is unknown, or it is a family that still has variants.
    """
    removed = entry(name)
    if not removed.is_variant:
        variants = sorted(n for n, e in _REGISTRY.items() if e.family is removed.family and e.is_variant)
        if variants:
            raise ValueError(f"probe family {name!r} still has the variant(s) {variants}: unregister them first")
    return _REGISTRY.pop(name)


def available(*, attentive: bool | None = None, sliced: bool | None = None, variants: bool = True) -> list[str]:
    """Registered names, sorted.

    Args:
        attentive: Only names whose family has (True) or lacks (False) attention predictors.
        sliced: Only names whose predictors do (True) or do not (False) own disjoint pooled columns.
        variants: Include named variants (False: families only).
    """
    out = []
    for name, e in _REGISTRY.items():
        if not variants and e.is_variant:
            continue
        if attentive is not None and e.family.attentive != attentive:
            continue
        if sliced is not None and e.family.sliced != sliced:
            continue
        out.append(name)
    return sorted(out)


def standard_set() -> list[str]:
    """One name per family, sorted by family: its standard variant where it has one, else the family.

    The notebooks' comparison of "every probe" uses this set, so a newly registered family joins it.
    """
    standard = {e.family: e.name for e in _REGISTRY.values() if e.standard}
    return [standard.get(e.family, e.name) for e in sorted(_REGISTRY.values(), key=lambda e: e.name) if not e.is_variant]


def entry(name: str) -> ProbeEntry:
    """The registry entry of `name`; unknown names raise a ValueError suggesting close matches."""
    if name not in _REGISTRY:
        lowered = {n.lower(): n for n in _REGISTRY}
        close = [lowered[c] for c in difflib.get_close_matches(str(name).lower(), lowered, n=3, cutoff=0.5)]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown probe {name!r}.{hint} Available probes: {', '.join(available())}")
    return _REGISTRY[name]


def probe_class(name: str) -> type[Probe]:
    """The family class that `name` (a family or a variant) builds."""
    return entry(name).family


def accepted_options(name: str) -> set[str]:
    """Build options that `name` takes (its family's constructor arguments besides dim and num_classes)."""
    return _accepted(probe_class(name))


def build(name: str, dim: int, num_classes: int, *, seed: int | None = None, **options: Any) -> Probe:
    """Build a probe by name.

    Args:
        name: A registered family or variant (see :func:`available`).
        dim: Token width D.
        num_classes: Number of classes C.
        seed: When given, parameters are initialised under this seed inside
            ``torch.random.fork_rng``, leaving the global random state untouched.
        **options: Probe-specific options (e.g. ``num_queries``, ``d_out`` for EP; ``heads``;
            ``grid=(rows, cols)``); they override a variant's fixed options.
    """
    e = entry(name)
    accepted = _accepted(e.family)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"probe {name!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    options = {**e.options, **options}
    if seed is None:
        return e.family(dim, num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return e.family(dim, num_classes, **options)


def probe_specs(probes: str | Sequence[str] | Mapping[str, Mapping[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Probe specs as ``{label: build options}``; the options' ``name`` is the registered name.

    Args:
        probes: Registered names (families or variants, e.g. ``"ep16"``), or a mapping label ->
            options, e.g. ``{"ep_d2": {"name": "ep", "num_queries": 16, "d_out": 2}}`` (``name``
            defaults to the label).

    Raises:
        ValueError: No probes, or an unknown probe name (before any training).
    """
    if isinstance(probes, str):
        probes = [probes]
    if not isinstance(probes, Mapping):
        probes = dict.fromkeys(probes)
    specs: dict[str, dict[str, Any]] = {}
    for label, options in probes.items():
        options = dict(options or {})
        options.setdefault("name", label)
        probe_class(options["name"])  # unknown names fail here, before any training
        specs[str(label)] = options
    if not specs:
        raise ValueError("no probes given: pass e.g. probes=('cls', 'gap', 'ep16')")
    return specs


def _accepted(cls: type[Probe]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {p for p in params if p not in ("self", "dim", "num_classes") and params[p].kind is not inspect.Parameter.VAR_KEYWORD}
