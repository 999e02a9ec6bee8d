"""Shared test builders: small token sets (class-coded with GT boxes, scattered, noise), seeded patch tensors, probes."""

from __future__ import annotations

import numpy as np
import torch

import epviz.probes as probes
from epviz.tokens import TokenOrigin, TokenSet


def toy_tokens(n: int, seed: int, layer: int = 1) -> tuple[TokenSet, np.ndarray]:
    """Class-coded tokens placed inside a box (the rest noise), and those boxes on a 32x32 image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(7).normal(size=(3, 32)) * 3
    patch = rng.normal(size=(n, 16, 32))
    patch[:, :4] += centres[labels][:, None]  # the first grid row carries the class
    boxes = np.tile([0.0, 0.0, 32.0, 8.0], (n, 1))
    return token_set(patch, patch[:, :1].mean(1, keepdims=True), labels, layer=layer, num_classes=3), boxes


def token_set(
    patch: np.ndarray,
    prefix: np.ndarray | None,
    labels: np.ndarray,
    grid: tuple[int, int] = (4, 4),
    layer: int = 1,
    num_classes: int | None = None,
) -> TokenSet:
    """A TokenSet of the float32 tokens of block `layer` of a backbone named "toy"."""
    return TokenSet(
        patch=patch.astype(np.float32),
        prefix=None if prefix is None else prefix.astype(np.float32),
        labels=labels,
        grid=grid,
        num_classes=num_classes,
        origin=TokenOrigin(backbone="toy", layer=layer),
    )


def noise_tokens(
    rng: np.random.Generator, n: int, dim: int = 32, grid: tuple[int, int] = (4, 4), layer: int = 1, classes: int = 3
) -> TokenSet:
    """Gaussian patch tokens (no prefix) and random labels, drawn from `rng` in that order."""
    return token_set(rng.normal(size=(n, grid[0] * grid[1], dim)), None, rng.integers(0, classes, n), grid, layer)


def scattered_tokens(n: int, classes: int = 4, dim: int = 32, grid: tuple[int, int] = (4, 4), seed: int = 0) -> TokenSet:
    """Tokens whose class shows as a shifted direction on a random 40% of the patches (a [CLS] of noise)."""
    rng = np.random.default_rng(seed)
    tokens = grid[0] * grid[1]
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    patch = rng.normal(size=(n, tokens, dim)) + 0.7 * centres[labels][:, None, :] * (rng.random((n, tokens, 1)) < 0.4)
    return token_set(patch, rng.normal(size=(n, 1, dim)), labels, grid, layer=5)


def sharp_probe(name: str, tokens: TokenSet | None, num_classes: int, seed: int = 0, scale: float | None = None, **options):
    """A probe with peaked maps (EP's queries times `scale`, default 150; other weights times 4) and, given
    tokens, BatchNorm statistics of one train-mode pass."""
    if name.startswith("ep"):
        options.setdefault("num_queries", 8)
    probe = probes.build(name, options.pop("dim", 32), num_classes, seed=seed, grid=options.pop("grid", (4, 4)), **options)
    with torch.no_grad():
        if name.startswith("ep"):
            probe.queries.mul_(150 if scale is None else scale)
        else:
            for p in probe.parameters():
                if p.ndim > 1:
                    p.mul_(4)
        if tokens is not None:
            b = tokens.batch(np.arange(64))
            probe.train()
            probe(b.patch, b.prefix)
    return probe.eval()


class Boxes:
    def __init__(self, boxes):
        self.boxes, self.image_size = boxes, 32

    def __len__(self):
        return len(self.boxes)


def record_calls(monkeypatch, obj, method: str) -> list[int]:
    """Wrap ``obj.method(patch, prefix=None)`` so that each call appends ``len(patch)`` to the list returned."""
    calls: list[int] = []
    own = getattr(obj, method)

    def recorded(patch, prefix=None):
        calls.append(len(patch))
        return own(patch, prefix)

    monkeypatch.setattr(obj, method, recorded)
    return calls


def patch_tokens(b: int = 3, n: int = 16, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal patch tokens (b, n, d)."""
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


class PlainProbe(probes.Probe):
    """An unregistered family built from ``dim``, ``num_classes`` and ``grid`` alone; subclasses define ``_pool``."""

    def __init__(self, dim, num_classes, grid=None):
        super().__init__(dim, num_classes, grid=grid)
        self._finish(self.dim)


class OneMapProbe(PlainProbe):
    """A :class:`PlainProbe` with one attention predictor."""

    attentive = True

    @property
    def num_predictors(self):
        return 1
