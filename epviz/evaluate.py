"""Evaluation of trained probes on a TokenSet: predictions, accuracy, attention maps.

Everything here runs the probe in eval mode without gradients and restores the
probe's previous mode afterwards. Accuracies are fractions in [0, 1].

No number comes from non-finite input: every entry point refuses tokens that hold NaN or inf
(:func:`ensure_finite`, the check :func:`epviz.fit` makes: the whole set scanned once, the answer
remembered for read-only sets and in a token cache's manifest), and :func:`predict`,
:func:`accuracy` and :func:`loss_and_accuracy` refuse non-finite logits, naming the probe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from epviz.checks import check_int, check_sequence
from epviz.errors import ConfigError, DataError, WeightsError
from epviz.probes import Probe
from epviz.runtime import PRECISIONS, autocast, resolve_device
from epviz.tokens import TokenBatch, TokenSet

__all__ = [
    "KNN_FEATURES",
    "Predictions",
    "knn_predict",
    "knn_predictions",
    "predict",
    "accuracy",
    "attention_maps",
    "collect_attention",
    "topk_accuracy",
    "topk_hits",
    "eval_mode",
    "iter_batches",
    "loss_and_accuracy",
    "ensure_finite",
    "check_labels",
]


@dataclass
class Predictions:
    """A probe's outputs on a token set.

    Attributes:
        logits: Class scores, shape (n, C), float32.
        labels: True classes, shape (n,).
        index: Positions of the samples in the TokenSet, shape (n,).
    """

    logits: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        """Predicted classes, shape (n,)."""
        return self.logits.argmax(axis=1)

    def accuracy(self, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
        """Top-k accuracies as {"top1": ..., "top5": ...}.

        Raises:
            ConfigError: A label outside [0, number of classes), or a k that is not a positive integer.
        """
        return topk_accuracy(torch.from_numpy(self.logits), torch.from_numpy(self.labels), topk)

    def hits(self, k: int = 1) -> np.ndarray:
        """Per sample, whether its label is among the k best logits (what top-k accuracy averages), shape (n,)."""
        return topk_hits(torch.from_numpy(self.logits), torch.from_numpy(self.labels), k).numpy()

    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class, shape (n,)."""
        return torch.from_numpy(self.logits).double().softmax(dim=1).max(dim=1).values.numpy()

    def _confidence_bins(self, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's confidence and its bin among `bins` equal-width bins over [0, 1]."""
        bins = check_int("bins", bins, 1)
        confidence = self.confidence()
        return confidence, np.minimum((confidence * bins).astype(np.int64), bins - 1)

    def calibration_gaps(self, bins: int = 15) -> np.ndarray:
        """(n, bins): each sample's (correct - confidence) in the column of its confidence bin (equal width over
        [0, 1]), 0 elsewhere. The expected calibration error is ``abs(gaps.mean(0)).sum()``."""
        confidence, column = self._confidence_bins(bins)
        gaps = np.zeros((len(confidence), bins))
        gaps[np.arange(len(confidence)), column] = (self.preds == self.labels) - confidence
        return gaps

    def reliability(self, bins: int = 15) -> pd.DataFrame:
        """The reliability diagram's table: per confidence bin its range, count, mean confidence and accuracy
        (NaN in empty bins), and ``gap`` = its share of the expected calibration error."""
        confidence, column = self._confidence_bins(bins)
        table = pd.DataFrame({"bin": column, "confidence": confidence, "accuracy": (self.preds == self.labels).astype(float)})
        per_bin = table.groupby("bin").agg(
            count=("confidence", "size"), confidence=("confidence", "mean"), accuracy=("accuracy", "mean")
        )
        per_bin = per_bin.reindex(range(bins)).assign(lo=np.arange(bins) / bins, hi=np.arange(1, bins + 1) / bins)
        per_bin["count"] = per_bin["count"].fillna(0).astype(int)
        per_bin["gap"] = pd.Series(np.abs(self.calibration_gaps(bins).mean(axis=0))).where(per_bin["count"] > 0)
        return per_bin.reset_index()[["bin", "lo", "hi", "count", "confidence", "accuracy", "gap"]]

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: index, label, pred, correct."""
        preds = self.preds
        return pd.DataFrame({"index": self.index, "label": self.labels, "pred": preds, "correct": preds == self.labels})


def check_labels(labels, num_classes: int, what: str, owner: str) -> None:
    """Refuse labels outside [0, num_classes): scored anyway they would count as silent misses.

    Args:
        labels: Class indices (any array-like).
        num_classes: Number of classes C the scores cover.
        what: Whose labels, for the message ("train", "validation"; "the" for no qualifier).
        owner: What has C classes, for the message ("probe 'ep'", "the logits").

    Raises:
        ConfigError: Names the range found, the valid range and how many samples lie outside.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < num_classes:
        return
    outside = int(((labels < 0) | (labels >= num_classes)).sum())
    fix = (
        "negative labels are not classes: fix the labels"
        if lo < 0
        else f"build the probe with num_classes={hi + 1}, score a trained probe on the classes it was trained on, or fix the labels"
    )
    whose = "the labels" if what in ("", "the") else f"the {what} labels"
    raise ConfigError(
        f"{whose} range from {lo} to {hi} (max label {hi}) but {owner} has num_classes={num_classes}; "
        f"labels must lie in [0, {num_classes - 1}] and {outside} of {labels.size} samples lie outside: {fix}"
    )


def _check_topk(topk: Sequence[int] | int) -> list[int]:
    if isinstance(topk, (int, np.integer)) and not isinstance(topk, bool):
        topk = [topk]
    return list(check_sequence("topk", topk, lambda name, k: check_int(name, k, 1), example="(1, 5)"))


def _check_run_options(batch_size, precision: str) -> None:
    check_int("batch_size", batch_size, 1)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose label is among the k best logits, for each k.

    A k larger than the number of classes counts every sample as correct.

    Raises:
        DataError: No samples, logits and labels of different lengths, or logits holding NaN or inf.
        ConfigError: A label outside [0, number of classes), or a k that is not a positive integer.
    """
    ks = _check_topk(topk)
    if len(labels) == 0:
        raise DataError("cannot compute accuracy on 0 samples")
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise DataError(
            f"logits must be (samples, classes) with one row per label; got {tuple(logits.shape)} for {len(labels)} labels"
        )
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        raise DataError(
            f"the logits hold NaN or inf (row {int(bad.nonzero()[0, 0])} first, {int(bad.sum())} of {len(bad)} rows): "
            "no accuracy is computed from them; check the probe and the tokens that gave them"
        )
    check_labels(labels.cpu().numpy() if torch.is_tensor(labels) else labels, int(logits.shape[1]), "the", "the logits")
    return {f"top{k}": topk_hits(logits, labels, k).float().mean().item() for k in ks}


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample, whether its label is among the k best logits (a k beyond the classes counts every sample)."""
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(dim=1)


@contextlib.contextmanager
def eval_mode(probe: Probe, grad: bool = False) -> Iterator[Probe]:
    """Put `probe` in eval mode, gradients off unless `grad`; restore its mode afterwards."""
    was_training = probe.training
    probe.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield probe
    finally:
        probe.train(was_training)


def iter_batches(
    tokens: TokenSet,
    batch_size: int,
    device: torch.device,
    index: Iterable[int] | None = None,
) -> Iterator[TokenBatch]:
    """Batches of `tokens` in stored order, or of the samples at `index` in the order given.

    Raises:
        DataError: The token set is empty, or holds NaN or inf anywhere (:func:`ensure_finite`).
        ConfigError: batch_size not a positive integer, or an index outside [0, len(tokens)).
    """
    if len(tokens) == 0:
        raise DataError("the token set is empty: there is nothing to evaluate")
    batch_size = check_int("batch_size", batch_size, 1)
    ensure_finite(tokens, "")
    if index is None:
        yield from tokens.batches(batch_size, device=device)
        return
    index = _as_index(index, len(tokens))
    for start in range(0, len(index), batch_size):
        yield tokens.batch(index[start : start + batch_size], device=device)


def _as_index(index: Iterable[int], n: int) -> np.ndarray:
    """`index` as int64 positions in [0, n), or a ConfigError."""
    raw = np.asarray(list(index) if not isinstance(index, np.ndarray) else index)
    if raw.ndim != 1 or (raw.size and raw.dtype.kind not in "iu"):
        raise ConfigError(f"index must be a 1-D sequence of integer sample positions, got dtype {raw.dtype} shape {raw.shape}")
    index = raw.astype(np.int64, copy=False)
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise ConfigError(f"index must lie in [0, {n}); got values from {index.min()} to {index.max()}")
    return index


def _device_for(probe: Probe, device: str | torch.device | None) -> torch.device:
    if device is None:
        return next(probe.parameters()).device
    device = resolve_device(device)
    probe.to(device)
    return device


def predict(
    probe: Probe,
    tokens: TokenSet,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    uniform: Iterable[int] | int | None = None,
    index: Iterable[int] | None = None,
) -> Predictions:
    """Logits of `probe` on every sample of `tokens` (or those at `index`).

    Args:
        probe: A trained probe.
        tokens: The token set to score.
        batch_size: Samples per forward pass.
        device: Where to run; None keeps the probe where it is.
        precision: "fp32" or "bf16".
        uniform: Predictors replaced by the uniform distribution (see :class:`~epviz.probes.Probe`).
        index: Optional subset of sample positions.

    Raises:
        ConfigError: batch_size, precision or index out of range. Labels are not checked here (they
            only ride along); :meth:`Predictions.accuracy` checks them.
        DataError: Tokens holding NaN or inf (:func:`ensure_finite`), or a probe that gives NaN or inf
            logits on finite tokens (WeightsError when its weights hold NaN or inf).
    """
    _check_run_options(batch_size, precision)
    if index is not None:
        index = _as_index(index, len(tokens))
    device = _device_for(probe, device)
    logits, labels, positions = [], [], []
    with eval_mode(probe):
        for batch in iter_batches(tokens, batch_size, device, index):
            with autocast(device, precision):
                out = probe(batch.patch, batch.prefix, uniform=uniform)
            values = out.float().cpu().numpy()
            _check_logits(probe, values, batch.index, precision)
            logits.append(values)
            labels.append(batch.labels.cpu().numpy())
            positions.append(batch.index.numpy())
    if not logits:
        c = probe.num_classes
        return Predictions(np.zeros((0, c), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Predictions(np.concatenate(logits), np.concatenate(labels), np.concatenate(positions))


KNN_FEATURES = ("cls", "gap")


def _knn_features(tokens: TokenSet, feature: str, index: np.ndarray) -> torch.Tensor:
    batch = tokens.batch(index)
    if feature == "cls":
        if batch.prefix is None:
            raise ConfigError("k-NN on [CLS] needs prefix tokens, and these tokens have none: use feature='gap'")
        x = batch.prefix[:, 0]
    else:
        x = batch.patch.mean(dim=1)
    return F.normalize(x.float(), dim=1)


def knn_predict(
    train: TokenSet,
    test: TokenSet,
    *,
    feature: str = "cls",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Predictions:
    """A non-parametric reader of the same tokens: cosine k-NN on [CLS] (``"cls"``) or on the mean patch token (``"gap"``).

    Each test image's k nearest training images vote with weight exp(cosine / temperature) (DINO's
    weighted k-NN); the returned logits are the log vote shares, so :meth:`Predictions.accuracy`,
    :meth:`Predictions.confidence` and :meth:`Predictions.reliability` read them as a probe's.

    Raises:
        ConfigError: An unknown feature, k outside [1, len(train)], a non-positive temperature, [CLS]
            asked of tokens without prefix tokens, or tokens of different widths.
    """
    if feature not in KNN_FEATURES:
        raise ConfigError(f"k-NN feature must be one of {KNN_FEATURES} ([CLS], or the mean patch token), got {feature!r}")
    k = check_int("k", k, 1)
    if k > len(train):
        raise ConfigError(f"k={k} neighbours asked of a training set of {len(train)} images: use k <= {len(train)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    if train.dim != test.dim:
        raise ConfigError(f"train tokens have width {train.dim} and test tokens {test.dim}: k-NN compares tokens of one backbone")
    ensure_finite(train, "the k-NN training tokens")
    ensure_finite(test, "the k-NN test tokens")
    bank = torch.cat(
        [_knn_features(train, feature, np.arange(i, min(i + batch_size, len(train)))) for i in range(0, len(train), batch_size)]
    )
    bank_labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.int64)
    classes = int(max(train.num_classes or 0, test.num_classes or 0, int(bank_labels.max()) + 1))
    logits = []
    for start in range(0, len(test), batch_size):
        query = _knn_features(test, feature, np.arange(start, min(start + batch_size, len(test))))
        sims, nearest = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[nearest], (sims.double() / temperature).exp())
        logits.append((votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log().float())
    return Predictions(torch.cat(logits).numpy(), np.asarray(test.labels), np.arange(len(test)))


def knn_predictions(train: TokenSet, test: TokenSet, k: int = 20) -> dict[str, Predictions]:
    """:func:`knn_predict` on every feature the tokens have ([CLS] only with prefix tokens), k capped at len(train)."""
    k = min(k, len(train))
    return {f: knn_predict(train, test, feature=f, k=k) for f in KNN_FEATURES if f == "gap" or train.prefix is not None}


def accuracy(
    probe: Probe,
    tokens: TokenSet,
    topk: Sequence[int] = (1, 5),
    uniform: Iterable[int] | int | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-k accuracies of `probe` on `tokens`, e.g. {"top1": 0.75, "top5": 0.92}.

    Raises:
        ConfigError: A label outside [0, probe.num_classes) (checked before any forward pass), a k
            that is not a positive integer, or batch_size / precision out of range.
        DataError: Tokens holding NaN or inf, or non-finite logits (see :func:`predict`).
    """
    _check_topk(topk)
    _check_run_options(batch_size, precision)
    check_labels(tokens.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    preds = predict(probe, tokens, batch_size=batch_size, device=device, precision=precision, uniform=uniform)
    return preds.accuracy(topk)


def loss_and_accuracy(
    probe: Probe,
    tokens: TokenSet,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of `probe` on `tokens`.

    Raises:
        ConfigError: A label outside [0, probe.num_classes), or batch_size / precision out of range.
        DataError: Tokens holding NaN or inf, or non-finite logits (see :func:`predict`).
    """
    _check_run_options(batch_size, precision)
    check_labels(tokens.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    device = _device_for(probe, device)
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(probe):
        for batch in iter_batches(tokens, batch_size, device):
            with autocast(device, precision):
                logits = probe(batch.patch, batch.prefix).float()
            if not bool(torch.isfinite(logits).all()):
                _check_logits(probe, logits.cpu().numpy(), batch.index, precision)
            total_loss += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == batch.labels).sum().item()
            count += len(batch.labels)
    return total_loss / count, correct / count


def ensure_finite(tokens: TokenSet | TokenBatch, what: str = "") -> None:
    """Raise a DataError when `tokens` hold NaN or inf, naming the first bad sample.

    A TokenSet is checked whole (every sample, every view), the check :func:`epviz.fit` makes: its
    scan (:meth:`~epviz.tokens.TokenSet.find_nonfinite`) runs once for read-only sets (memory
    maps, a cache's tokens) and is remembered, for a cache's tokens also in the cache's manifest.
    A TokenBatch is checked as it is.

    Args:
        tokens: A TokenSet or a TokenBatch.
        what: Whose tokens, for the message ("train", "validation"; "" for none).
    """
    whose = f"the {what} tokens" if what else "the tokens"
    if isinstance(tokens, TokenSet):
        found = tokens.find_nonfinite()
        if found is None:
            return
        cache = f" (token cache {tokens.origin.cache})" if tokens.origin.cache else ""
        raise DataError(
            f"{whose}{cache} contain NaN or inf ({found.part} tokens of sample {found.first}; {found.count} of "
            f"{found.total} samples hold NaN or inf): no number is computed from them; fix or re-extract them (check "
            "the backbone's weights and the images first; with finite ones, dtype='float32' avoids float16 overflow)"
        )
    batch = tokens
    for name, t in (("patch", batch.patch), ("prefix", batch.prefix)):
        if t is None:
            continue
        bad = ~torch.isfinite(t).flatten(1).all(dim=1)
        if bad.any():
            first = int(batch.index[bad.nonzero()[0, 0].cpu()].item())
            raise DataError(
                f"{whose} contain NaN or inf ({name} tokens of sample {first}, among "
                f"{int(bad.sum())} bad samples in its batch); fix or re-extract them before training"
            )


def _check_logits(probe: Probe, logits: np.ndarray, index: torch.Tensor, precision: str) -> None:
    """Refuse a batch's non-finite logits (the tokens were checked finite): the probe made them.

    Raises:
        WeightsError: The probe's parameters or buffers hold NaN or inf (named).
        DataError: Its weights are finite: an overflow; the message names the probe and the fix.
    """
    bad = ~np.isfinite(logits).all(axis=1)
    if not bad.any():
        return
    first = int(index[int(np.flatnonzero(bad)[0])])
    broken = [
        name
        for name, t in [*probe.named_parameters(), *probe.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    head = (
        f"probe '{probe.name}' produced non-finite logits (NaN or inf) for sample {first} ({int(bad.sum())} of the "
        f"{len(bad)} samples of its batch) from finite tokens"
    )
    if broken:
        raise WeightsError(
            f"{head}: its weights hold NaN or inf ({', '.join(broken[:4])}{', ...' if len(broken) > 4 else ''}); "
            "no score is computed from them: retrain the probe or load an undamaged copy of it"
        )
    raise DataError(
        f"{head} although its weights are finite: an overflow (precision={precision!r}); no score is computed from "
        "them: evaluate with precision='fp32', or check how the probe was trained"
    )


def attention_maps(
    probe: Probe,
    tokens: TokenSet,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sample positions, maps) one batch at a time; maps are float32 (b, K, N).

    Only one batch of maps is held at a time; use :func:`collect_attention` for the full array.

    Raises:
        ConfigError: batch_size, precision or index out of range.
    """
    _check_run_options(batch_size, precision)
    if probe.num_predictors == 0:
        raise ValueError(f"probe '{probe.name}' has no attention predictors: attention maps exist only for attentive probes")
    device = _device_for(probe, device)
    for batch in iter_batches(tokens, batch_size, device, index):
        # enter and leave eval mode per batch: the caller's code between batches keeps its own modes
        with eval_mode(probe), autocast(device, precision):
            maps = probe.attention(batch.patch, batch.prefix)
        yield batch.index.numpy(), maps.float().cpu().numpy()


def collect_attention(
    probe: Probe,
    tokens: TokenSet,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """All attention maps as one float32 array (n, K, N), in the order of `index` (default: stored order).

    Raises:
        ConfigError: batch_size, precision or index out of range.
    """
    _check_run_options(batch_size, precision)
    parts = [maps for _, maps in attention_maps(probe, tokens, batch_size, index, device, precision)]
    if not parts:
        return np.zeros((0, probe.num_predictors, tokens.num_tokens), np.float32)
    return np.concatenate(parts)
