"""Small class-coded token sets with GT boxes, shared by the tests of runs, reports and figures."""

from __future__ import annotations

import numpy as np
import torch

from epviz.tokens import TokenOrigin, TokenSet


def toy_tokens(n: int, seed: int, layer: int = 1) -> tuple[TokenSet, np.ndarray]:
    """Class-coded tokens placed inside a box (the rest noise), and those boxes on a 32x32 image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(7).normal(size=(3, 32)) * 3
    patch = rng.normal(size=(n, 16, 32))
    patch[:, :4] += centres[labels][:, None]  # the first grid row carries the class
    boxes = np.tile([0.0, 0.0, 32.0, 8.0], (n, 1))
    ts = TokenSet(
        patch=patch.astype(np.float32),
        prefix=patch[:, :1].mean(1, keepdims=True).astype(np.float32),
        labels=labels,
        grid=(4, 4),
        num_classes=3,
        origin=TokenOrigin(backbone="toy", layer=layer),
    )
    return ts, boxes


def scattered_tokens(n: int, classes: int = 4, dim: int = 32, grid: tuple[int, int] = (4, 4), seed: int = 0) -> TokenSet:
    """Tokens whose class shows as a shifted direction on a random 40% of the patches (a [CLS] of noise)."""
    rng = np.random.default_rng(seed)
    tokens = grid[0] * grid[1]
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    patch = rng.normal(size=(n, tokens, dim)) + 0.7 * centres[labels][:, None, :] * (rng.random((n, tokens, 1)) < 0.4)
    prefix = rng.normal(size=(n, 1, dim))
    return TokenSet(
        patch=patch.astype(np.float32),
        prefix=prefix.astype(np.float32),
        labels=labels,
        grid=grid,
        origin=TokenOrigin(backbone="toy", layer=5),
    )


def sharp_probe(name: str, tokens: TokenSet | None, num_classes: int, seed: int = 0, **options):
    """A probe with peaked maps (large queries / weights) and, given tokens, BatchNorm statistics of one train-mode pass."""
    import epviz.probes as probes

    if name.startswith("ep"):
        options.setdefault("num_queries", 8)
    probe = probes.build(name, options.pop("dim", 32), num_classes, seed=seed, grid=options.pop("grid", (4, 4)), **options)
    with torch.no_grad():
        if name.startswith("ep"):
            probe.queries.mul_(150)
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
