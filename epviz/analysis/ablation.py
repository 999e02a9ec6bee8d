"""Uniform ablation of attention predictors (Fig. 4, y axis).

Definition (ours): for predictor j, ``delta_acc_j = acc(full) - acc(predictor j uniform)``,
top-1 accuracy on the given tokens, where "uniform" replaces that predictor's distribution
by the uniform one at inference and leaves everything else unchanged (the probe's
``uniform=[j]`` argument). For EP this turns y_j into the mean of V^(j) over the keys.

Cost: the tokens of a batch are moved to the device once and the full logits are computed
once. For EP (``ep``, ``ep_all``) the pooled feature is also computed once: the uniform
feature of every query, ``mean(keys) W_V``, is one more small matmul, and the K ablated
features are built by swapping one query's slice at a time before ``norm`` and ``head``
(one batched call for all K). Other probes run their pooling once per predictor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from epviz.analysis._common import context_columns, frame, prepare_probe, require_predictors
from epviz.evaluate import eval_mode, iter_batches
from epviz.probes._base import Probe
from epviz.probes.ep import EfficientProbe
from epviz.runtime import autocast
from epviz.tokens import TokenBatch, TokenSet

__all__ = ["uniform_ablation", "ablated_logits", "uniform_effect"]

METHODS = ("auto", "fast", "direct")


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fast_path_available(probe: Probe) -> bool:
    """Whether the EP slice-swap shortcut reproduces ``probe(..., uniform=[j])`` exactly."""
    cls = type(probe)
    return (
        isinstance(probe, EfficientProbe)
        and cls._pool is EfficientProbe._pool
        and cls._weights is EfficientProbe._weights
        and not _has_hooks(probe.hook_attn)
        and not _has_hooks(probe.hook_pooled)
    )


def _ep_ablated_logits(probe: EfficientProbe, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    y = probe.features(batch.patch, batch.prefix)  # (B, D_o), pooled once
    keys = probe._keys(*probe._validate(batch.patch, batch.prefix))
    w = probe.value.weight.view(probe.num_queries, probe.slice_width, probe.dim)
    y_uniform = torch.einsum("bd,mcd->bmc", keys.mean(dim=1), w.to(keys.dtype)).reshape(y.shape)
    k = probe.num_predictors
    owner = torch.arange(probe.width, device=y.device) // probe.slice_width  # column -> query
    swap = owner.unsqueeze(0) == torch.arange(k, device=y.device).unsqueeze(1)  # (K, D_o)
    ablated = torch.where(swap.unsqueeze(1), y_uniform.unsqueeze(0), y.unsqueeze(0))  # (K, B, D_o)
    logits = probe.head(probe.norm(torch.cat([y, ablated.reshape(-1, probe.width)])))
    full, rest = logits[: len(y)], logits[len(y) :]
    return full, rest.view(k, len(y), -1)


def _direct_ablated_logits(probe: Probe, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    full = probe(batch.patch, batch.prefix)
    ablated = torch.stack([probe(batch.patch, batch.prefix, uniform=[j]) for j in range(probe.num_predictors)])
    return full, ablated


def ablated_logits(probe: Probe, batch: TokenBatch, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits (B, C) and the logits with each predictor made uniform (K, B, C), for one batch.

    Args:
        probe: An attentive probe in eval mode (call under ``torch.no_grad()``).
        batch: Tokens on the probe's device.
        method: "auto" (EP shortcut when it applies), "fast" (require the shortcut) or
            "direct" (one ``probe(..., uniform=[j])`` call per predictor).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fast = _fast_path_available(probe)
    if method == "fast" and not fast:
        raise ValueError(
            f"method='fast' needs an EP probe ('ep', 'ep_all') without hooks on hook_attn / hook_pooled; "
            f"probe '{probe.name}' does not qualify: use method='auto' or 'direct'"
        )
    if fast and method != "direct":
        return _ep_ablated_logits(probe, batch)
    return _direct_ablated_logits(probe, batch)


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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k = probe.num_predictors
    chosen = list(range(k)) if predictors is None else sorted({int(j) for j in predictors})
    bad = [j for j in chosen if not 0 <= j < k]
    if bad:
        raise ValueError(f"probe '{probe.name}' has {k} predictors (0..{k - 1}); predictors got {bad}")
    device = prepare_probe(probe, device)
    correct_full, correct_uniform, seen = 0, np.zeros(k, dtype=np.int64), 0
    with eval_mode(probe):
        for batch in iter_batches(tokens, batch_size, device, index):
            with autocast(device, precision):
                full, ablated = ablated_logits(probe, batch, method)
            labels = batch.labels
            correct_full += int((full.argmax(dim=-1) == labels).sum())
            correct_uniform += (ablated.argmax(dim=-1) == labels.unsqueeze(0)).sum(dim=1).cpu().numpy()
            seen += len(labels)
    if seen == 0:
        raise ValueError("uniform_ablation got no samples to evaluate (empty index)")
    acc_full = correct_full / seen
    rows = [
        dict(predictor=j, acc_full=acc_full, acc_uniform=correct_uniform[j] / seen,
             delta_acc=acc_full - correct_uniform[j] / seen, n_images=seen)
        for j in chosen
    ]
    return frame(rows, context_columns(context, probe, tokens))


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
    from epviz.evaluate import predict

    require_predictors(probe, "uniform_effect")
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
