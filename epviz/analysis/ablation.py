"""Uniform ablation of attention predictors (Fig. 4, y axis).

Definition (ours): for predictor j, ``delta_acc_j = acc(full) - acc(predictor j uniform)``,
top-1 accuracy on the given tokens, where "uniform" replaces that predictor's distribution
by the uniform one at inference and leaves everything else unchanged (the probe's
``uniform=[j]`` argument). For EP this turns y_j into the mean of V^(j) over the keys.

Cost: the tokens of a batch are moved to the device once and the full logits are computed
once; the K ablated logits come from :meth:`Probe.ablated_logits <epviz.probes.Probe.ablated_logits>`,
which EP answers with one small matmul and one batched head call (``probe.fast_ablation``)
and other probes with one pooling per predictor.

:class:`AblationMeter` is the common meter of this intervention and of its controls
(:mod:`epviz.analysis.controls`): it counts correct predictions and keeps each image's
correctness, full (n,) and ablated (n, K) booleans (n * (K + 1) bytes), for bootstrap
intervals (:mod:`epviz.analysis.intervals`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from epviz.analysis._common import require_predictors
from epviz.analysis.intervals import weighted_mean
from epviz.analysis.measure import measure
from epviz.analysis.meters import Meter, MeterBatch, register_meter
from epviz.evaluate import check_labels, predict
from epviz.probes import Probe
from epviz.tokens import TokenBatch, TokenSet

__all__ = ["METHODS", "AblationMeter", "UniformAblation", "ablated_logits", "uniform_ablation", "uniform_effect"]

METHODS = ("auto", "fast", "direct")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def ablated_logits(
    probe: Probe,
    batch: TokenBatch | MeterBatch,
    method: str = "auto",
    control: str = "uniform",
    replacement: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits (B, C) and the logits with each predictor ablated (K, B, C), for one batch.

    Args:
        probe: An attentive probe in eval mode (call under ``torch.no_grad()``).
        batch: Tokens on the probe's device.
        method: "auto" (the probe's own :meth:`~epviz.probes.Probe.ablated_logits`, with its
            shortcut where it has one), "fast" (require the shortcut: ``probe.fast_ablation``)
            or "direct" (one ``probe(..., uniform=[j])`` call per predictor).
        control: "uniform", "replace" or "zero" (see :meth:`~epviz.probes.Probe.ablated_logits`).
        replacement: The replacement maps of ``control="replace"``, (B or 1, K, R, N).
    """
    _check_method(method)
    extra = () if control == "uniform" and replacement is None else (control, replacement)
    if method == "direct":
        return Probe.ablated_logits(probe, batch.patch, batch.prefix, *extra)
    if method == "fast" and not probe.fast_ablation:
        raise ValueError(
            f"method='fast' needs a probe with an exact ablation shortcut (probe.fast_ablation), e.g. EP ('ep', "
            f"'ep_all') without hooks on hook_attn / hook_pooled; probe '{probe.name}' has none: use method='auto' or 'direct'"
        )
    return probe.ablated_logits(batch.patch, batch.prefix, *extra)


class AblationMeter(Meter):
    """Top-1 accuracy with each predictor ablated by one intervention, against the full accuracy.

    Subclasses set :attr:`control` (the column suffix) and implement :meth:`_logits`; a control
    that does not apply to a probe (:meth:`_unsupported`) gives NaN columns. Every image's
    correctness is kept for :meth:`resample`.

    Args:
        method: See :func:`ablated_logits`.
        predictors: Only report these predictors (default: all K).
    """

    control: ClassVar[str] = ""
    needs_maps = False

    def __init__(self, method: str = "auto", predictors: Iterable[int] | None = None) -> None:
        _check_method(method)
        self.method = method
        self.predictors = None if predictors is None else sorted({int(j) for j in predictors})
        self.chosen: list[int] = []
        self.correct_full, self.correct_uniform, self.seen = 0, np.zeros(0, dtype=np.int64), 0
        self.reason: str | None = None
        self._images: dict[str, list[np.ndarray]] = {"full": [], "ablated": [], "positions": []}

    @property
    def suffix(self) -> str:
        """The column suffix: ``""`` for uniform, ``"_" + control`` for the controls."""
        return "" if self.control == "uniform" else f"_{self.control}"

    def start(self, probe: Probe, tokens: TokenSet, dataset=None) -> None:
        k = probe.num_predictors
        self.chosen = list(range(k)) if self.predictors is None else self.predictors
        bad = [j for j in self.chosen if not 0 <= j < k]
        if bad:
            raise ValueError(f"probe '{probe.name}' has {k} predictors (0..{k - 1}); predictors got {bad}")
        self.correct_full, self.correct_uniform, self.seen = 0, np.zeros(k, dtype=np.int64), 0
        self._images = {"full": [], "ablated": [], "positions": []}
        self.reason = self._unsupported(probe, tokens)

    def _unsupported(self, probe: Probe, tokens: TokenSet) -> str | None:
        """Why the control does not apply to `probe` (its columns are then NaN), or None."""
        return None

    def _logits(self, batch: MeterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's full logits (b, C) and ablated logits (K, b, C)."""
        raise NotImplementedError

    def update(self, maps: torch.Tensor | None, batch: MeterBatch) -> None:
        if self.reason is not None:
            self.seen += len(batch)
            self._images["positions"].append(np.asarray(batch.index, dtype=np.int64))
            return
        with batch.autocast():
            full, ablated = self._logits(batch)
        labels = batch.labels
        right_full = full.argmax(dim=-1) == labels
        right = ablated.argmax(dim=-1) == labels.unsqueeze(0)  # (K, b)
        self.correct_full += int(right_full.sum())
        self.correct_uniform += right.sum(dim=1).cpu().numpy()
        self.seen += len(labels)
        self._images["full"].append(right_full.cpu().numpy())
        self._images["ablated"].append(right.cpu().numpy().T[:, self.chosen])
        self._images["positions"].append(np.asarray(batch.index, dtype=np.int64))

    def _check_seen(self) -> None:
        if self.seen == 0:
            raise ValueError(f"{self.name or type(self).__name__} got no samples to evaluate (empty index)")

    def summary(self) -> pd.DataFrame:
        self._check_seen()
        acc, delta = f"acc{self.suffix}", f"delta_acc{self.suffix}"
        if self.reason is not None:
            rows = [{"predictor": j, acc: np.nan, delta: np.nan, "n_images": self.seen} for j in self.chosen]
            return pd.DataFrame(rows, columns=["predictor", acc, delta, "n_images"])
        acc_full = self.correct_full / self.seen
        rows = [
            {
                "predictor": j,
                acc: self.correct_uniform[j] / self.seen,
                delta: acc_full - self.correct_uniform[j] / self.seen,
                "n_images": self.seen,
            }
            for j in self.chosen
        ]
        return pd.DataFrame(rows, columns=["predictor", acc, delta, "n_images"])

    def positions(self) -> np.ndarray | None:
        parts = self._images["positions"]
        return np.concatenate(parts) if parts else None

    def image_correct(self) -> tuple[np.ndarray, np.ndarray]:
        """Per image (in :meth:`positions` order): full prediction correct (n,), ablated ones correct (n, P)."""
        if not self._images["full"]:
            return np.zeros(0, bool), np.zeros((0, len(self.chosen)), bool)
        return np.concatenate(self._images["full"]), np.concatenate(self._images["ablated"])

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``delta_acc<suffix>`` per resample and predictor (the full and the ablated accuracy on the same images).

        NaN for a control that does not apply to the probe.
        """
        if self.reason is not None:
            return {f"delta_acc{self.suffix}": np.full((len(weights), len(self.chosen)), np.nan)}
        full, ablated = self.image_correct()
        acc_full = weighted_mean(weights, full)[:, None]
        return {f"delta_acc{self.suffix}": acc_full - weighted_mean(weights, ablated)}


@register_meter("uniform_ablation")
class UniformAblation(AblationMeter):
    """Accuracy with each predictor made uniform, against the full accuracy (Δacc).

    Args:
        method: See :func:`ablated_logits`.
        predictors: Only report these predictors (default: all K).
    """

    columns = {
        "delta_acc": "Δacc when the predictor is made uniform",
        "acc_full": "top-1 accuracy of the full probe",
        "acc_uniform": "top-1 accuracy with the predictor made uniform",
    }
    table_columns = ("delta_acc",)
    control = "uniform"
    order = 0.0
    table_order = 0.0

    def _logits(self, batch: MeterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return ablated_logits(batch.probe, batch, self.method)

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``acc_full`` and ``delta_acc`` per resample and predictor."""
        full, _ = self.image_correct()
        return {
            "acc_full": np.repeat(weighted_mean(weights, full)[:, None], len(self.chosen), axis=1),
            **super().resample(weights),
        }

    def summary(self) -> pd.DataFrame:
        self._check_seen()
        acc_full = self.correct_full / self.seen
        rows = [
            dict(
                predictor=j,
                acc_full=acc_full,
                acc_uniform=self.correct_uniform[j] / self.seen,
                delta_acc=acc_full - self.correct_uniform[j] / self.seen,
                n_images=self.seen,
            )
            for j in self.chosen
        ]
        return pd.DataFrame(rows, columns=["predictor", "acc_full", "acc_uniform", "delta_acc", "n_images"])


def uniform_ablation(
    probe: Probe,
    tokens: TokenSet,
    *,
    context: Mapping | None = None,
    predictors: Iterable[int] | None = None,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    method: str = "auto",
) -> pd.DataFrame:
    """Accuracy drop when each attention predictor is replaced by the uniform distribution.

    Args:
        probe: A trained attentive probe (``num_predictors > 0``).
        tokens: Evaluation tokens with labels.
        context: Values for the ``backbone``, ``layer``, ``probe``, ``seed`` columns (and any
            extra columns); defaults come from the probe's name and ``tokens.origin``.
        predictors: Only report these predictors (default: all K).
        batch_size: Samples per batch.
        index: Optional subset of sample positions.
        device: Where to run; None picks automatically.
        precision: "fp32" or "bf16".
        method: See :func:`ablated_logits`.

    Returns:
        One row per predictor: predictor, acc_full, acc_uniform, delta_acc, n_images.
    """
    require_predictors(probe, "uniform_ablation")
    meter = UniformAblation(method, predictors)
    return measure(
        probe, tokens, meters=[meter], index=index, batch_size=batch_size, device=device, precision=precision, context=context
    )


def uniform_effect(
    probe: Probe,
    tokens: TokenSet,
    predictors: Iterable[int],
    *,
    probs: np.ndarray | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Per image, how much making `predictors` uniform (together) hurts its prediction.

    The score is (correct before - correct after) + (true-class probability drop) / 2, so images
    whose prediction flips from right to wrong score highest, then those with the largest
    probability drop (the Explorer's "largest Δacc" order).

    Args:
        probe: A trained attentive probe.
        tokens: Evaluation tokens with labels.
        predictors: Predictors made uniform together.
        probs: The probe's softmax on `tokens`, if already computed (n, C).
        batch_size: Samples per forward pass.
    """
    require_predictors(probe, "uniform_effect")
    check_labels(tokens.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    before = predict(probe, tokens, batch_size=batch_size)
    labels = before.labels
    probs = _softmax(before.logits) if probs is None else np.asarray(probs)
    after = _softmax(predict(probe, tokens, batch_size=batch_size, uniform=sorted(int(j) for j in predictors)).logits)
    rows = np.arange(len(labels))
    flipped = (probs.argmax(1) == labels).astype(float) - (after.argmax(1) == labels).astype(float)
    drop = probs[rows, labels] - after[rows, labels]
    return flipped + drop / 2


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
