"""Entropy of attention maps (Fig. 4, x axis of panels 2 and 4).

Definition (ours): the Shannon entropy ``H = -sum_t a_t log a_t`` (natural log, so in nats,
with ``0 log 0 = 0``) of each predictor's distribution over the N patch tokens, per image;
reported as the mean and standard deviation over images, and normalised by ``log N``
(1 = uniform, 0 = all mass on one token). Maps that do not sum to 1 are renormalised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from epviz.analysis._common import context_columns, frame, require_predictors
from epviz.analysis.measure import measure
from epviz.analysis.meters import Meter, MeterBatch, register_meter
from epviz.probes import Probe
from epviz.tokens import TokenSet

__all__ = ["Entropy", "map_entropy", "entropy", "entropy_from_maps"]


def map_entropy(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Entropy in nats of each distribution along the last axis (renormalised to sum 1)."""
    p = torch.as_tensor(maps, dtype=torch.float64)
    if (p < 0).any() or not torch.isfinite(p).all():
        raise ValueError("maps must be non-negative and finite")
    total = p.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("a map sums to 0: it is not a distribution")
    return torch.special.entr(p / total).sum(-1).numpy()


@register_meter("entropy")
class Entropy(Meter):
    """Mean and standard deviation over images of each predictor's map entropy, in nats and over log N.

    In a pass (:func:`~epviz.analysis.measure`) it keeps every image's entropies ((n, K) float32), so
    ``entropy`` and ``entropy_norm`` get bootstrap intervals and ρ against them can be resampled.
    """

    columns = {"entropy": "entropy of the map (nats)", "entropy_norm": "entropy / log N (1 = uniform)"}
    table_columns = ("entropy_norm",)
    order = 20.0
    table_order = 10.0

    def __init__(self) -> None:
        self.setup(0, 0)

    def start(self, probe: Probe, tokens: TokenSet, dataset=None) -> None:
        self.setup(probe.num_predictors, tokens.num_tokens)

    def setup(self, k: int, n_tokens: int) -> None:
        """Empty the accumulators for `k` predictors over `n_tokens` tokens."""
        self.k, self.n_tokens, self.n = k, n_tokens, 0
        self.total, self.sq = np.zeros(k), np.zeros(k)
        self._images: dict[str, list[np.ndarray]] = {"entropy": [], "positions": []}

    def update(self, maps: np.ndarray | torch.Tensor | None, batch: MeterBatch | None = None) -> None:
        assert maps is not None  # needs_maps: measure hands this meter the maps
        h = map_entropy(maps)  # (b, K)
        if h.ndim != 2 or h.shape[1] != self.k:
            raise ValueError(f"maps must be (images, {self.k} predictors, tokens), got entropies of shape {h.shape}")
        self.total += h.sum(0)
        self.sq += (h**2).sum(0)
        self.n += len(h)
        if batch is not None:
            self._images["entropy"].append(h.astype(np.float32))
            self._images["positions"].append(np.asarray(batch.index))

    def positions(self) -> np.ndarray | None:
        parts = self._images["positions"]
        return np.concatenate(parts) if parts else None

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``entropy`` and ``entropy_norm`` per resample and predictor."""
        from epviz.analysis.intervals import weighted_mean

        h = weighted_mean(weights, np.concatenate(self._images["entropy"]).astype(np.float64))
        log_n = math.log(self.n_tokens) if self.n_tokens > 1 else math.nan
        return {"entropy": h, "entropy_norm": h / log_n}

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(self._rows())

    def _rows(self) -> list[dict]:
        if self.n == 0:
            raise ValueError("no maps were given: there is nothing to summarise")
        mean = self.total / self.n
        std = np.sqrt(np.clip(self.sq / self.n - mean**2, 0, None))
        log_n = math.log(self.n_tokens) if self.n_tokens > 1 else math.nan
        return [
            dict(
                predictor=j,
                entropy=float(mean[j]),
                entropy_std=float(std[j]),
                entropy_norm=float(mean[j] / log_n),
                entropy_norm_std=float(std[j] / log_n),
                num_tokens=self.n_tokens,
                n_images=self.n,
            )
            for j in range(self.k)
        ]


def entropy_from_maps(maps: np.ndarray | torch.Tensor, context: Mapping | None = None) -> pd.DataFrame:
    """Per-predictor entropy of precomputed maps.

    Args:
        maps: (n, K, N) distributions over the patch tokens, or (n, N) for one predictor.
        context: Values of the context columns.

    Returns:
        One row per predictor: entropy, entropy_std (nats), entropy_norm, entropy_norm_std
        (divided by log N), num_tokens, n_images.
    """
    maps = torch.as_tensor(maps)
    if maps.ndim == 2:
        maps = maps[:, None]
    if maps.ndim != 3:
        raise ValueError(f"maps must be (images, predictors, tokens), got shape {tuple(maps.shape)}")
    meter = Entropy()
    meter.setup(maps.shape[1], maps.shape[2])
    meter.update(maps)
    return frame(meter._rows(), context_columns(context))


def entropy(
    probe: Probe,
    tokens: TokenSet,
    *,
    context: Mapping | None = None,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Per-predictor entropy of `probe`'s attention maps over `tokens`, streamed in batches.

    Args:
        probe: A trained attentive probe.
        tokens: The tokens whose maps are measured.
        context: Values of the context columns (defaults: probe name, ``tokens.origin``).
        batch_size: Samples per batch.
        index: Optional subset of sample positions.
        device: Where to run; None picks automatically.
        precision: "fp32" or "bf16".

    Returns:
        See :func:`entropy_from_maps`.
    """
    require_predictors(probe, "entropy")
    return measure(
        probe, tokens, meters=[Entropy()], index=index, batch_size=batch_size, device=device, precision=precision, context=context
    )
