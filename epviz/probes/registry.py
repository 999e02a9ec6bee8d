"""The probe registry: names -> probe classes, and `build`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch

from epviz.probes.base import Probe

__all__ = ["register", "build", "available", "probe_class"]

_REGISTRY: dict[str, type[Probe]] = {}


def register(name: str) -> Callable[[type[Probe]], type[Probe]]:
    """Class decorator adding a probe family to the registry under `name`."""

    def add(cls: type[Probe]) -> type[Probe]:
        if name in _REGISTRY:
            raise ValueError(f"a probe named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Names of all registered probes, sorted."""
    return sorted(_REGISTRY)


def probe_class(name: str) -> type[Probe]:
    """The class registered under `name`; unknown names raise a ValueError suggesting close matches."""
    if name not in _REGISTRY:
        lowered = {n.lower(): n for n in _REGISTRY}
        close = [lowered[c] for c in difflib.get_close_matches(str(name).lower(), lowered, n=3, cutoff=0.5)]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown probe {name!r}.{hint} Available probes: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, dim: int, num_classes: int, *, seed: int | None = None, **options) -> Probe:
    """Build a probe by name.

    Args:
        name: A registered name (see :func:`available`).
        dim: Token width D.
        num_classes: Number of classes C.
        seed: When given, parameters are initialised under this seed inside
            ``torch.random.fork_rng``, leaving the global random state untouched.
        **options: Probe-specific options (e.g. ``num_queries``, ``d_out`` for EP;
            ``heads``; ``grid=(rows, cols)``).
    """
    cls = probe_class(name)
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"probe {name!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    if seed is None:
        return cls(dim, num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(dim, num_classes, **options)


def _accepted_options(cls: type[Probe]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {p for p in params if p not in ("self", "dim", "num_classes") and params[p].kind is not inspect.Parameter.VAR_KEYWORD}
