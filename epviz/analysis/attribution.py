"""Captum attribution beside the attention maps.

Two questions, each answered with captum and set against what the probe itself shows:

* **Which predictors does the classifier rely on?** :func:`predictor_importance` ablates each
  predictor's own columns of the pooled feature (``hook_pooled``, grouped by the probe's
  :meth:`~epviz.probes.Probe.feature_mask`) with captum's ``LayerFeatureAblation``.
  :func:`importance_vs_ablation` compares that ranking with the uniform-ablation Δacc
  (:func:`~epviz.analysis.uniform_ablation`) by Spearman rank correlation across predictors;
  :func:`importance_rank` runs both and adds the bootstrap interval of ρ over images.
* **Which tokens drive the decision, and are they the attended ones?** :func:`token_attribution`
  runs captum's ``IntegratedGradients`` on the patch tokens; :func:`attention_agreement`
  compares the per-token relevance with the attention maps image by image (Spearman rank
  correlation over the N tokens, top-k overlap); :func:`attribution_vs_attention` does both,
  with the maps taken in a separate plain pass (captum enlarges batches internally).

Definitions (ours):

* **Ablation baseline.** Predictor j's slice of the pooled feature y is replaced by a fixed
  value. Default ``"running_mean"``: the probe's BatchNorm running mean of those columns, i.e.
  their mean over the training set. After ``norm`` the slice is then exactly 0, so the
  classifier receives no evidence from predictor j and the others are untouched. ``"mean"``
  uses the mean of y over the evaluated samples instead, ``"zero"`` the value 0 (not neutral:
  BatchNorm moves 0 far from the data). Uniform ablation differs: it keeps a per-image value,
  the mean token of that image projected by the predictor (for EP).
* **Importance** of a predictor (or any group of pooled columns), averaged over images:
  ``importance_logit``: drop of the true-class logit; ``importance_prob``: drop of the
  true-class softmax probability; ``importance_acc``: drop of top-1 accuracy,
  ``acc_full - acc_ablated``, the counterpart of Δacc. Positive = the predictor helps.
* **Token relevance.** Integrated Gradients of the explained class logit (default: the
  predicted class) with respect to the patch tokens, summed over the D channels: one signed
  value per token whose sum over tokens equals ``f(x) - f(baseline)`` up to captum's
  convergence delta (completeness). Default baseline ``"mean"``: every patch token replaced
  by the image's mean patch token; an EP probe then attends uniformly, so ``f(baseline)`` is
  the output with every query made uniform. ``"zero"`` uses all-zero tokens.
* **Agreement** of relevance r and an attention map a on one image: Spearman rank correlation
  of r and a over the N tokens (NaN when either is constant), and the top-k overlap
  ``|top_k(r) ∩ top_k(a)| / k`` (chance level k / N). Relevance is compared signed (tokens
  that speak against the class rank last); ``absolute=True`` ranks by magnitude. The default
  attention map is the mean of the K predictors' maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from epviz.analysis._common import CONTEXT_KEYS, context_columns, frame, prepare_probe, require_predictors
from epviz.analysis.stats import row_spearman, spearman
from epviz.evaluate import check_labels, collect_attention, eval_mode, iter_batches
from epviz.probes import Probe, available
from epviz.runtime import autocast
from epviz.tokens import TokenBatch, TokenSet

__all__ = [
    "ABLATION_BASELINES",
    "TOKEN_BASELINES",
    "TARGETS",
    "AttributionComparison",
    "TokenAttribution",
    "attention_agreement",
    "attribution_vs_attention",
    "ImportanceRank",
    "importance_rank",
    "importance_vs_ablation",
    "join_importance",
    "predictor_importance",
    "sliced_probe_names",
    "token_attribution",
    "topk_overlap",
]

ABLATION_BASELINES = ("running_mean", "mean", "zero")
TOKEN_BASELINES = ("mean", "zero")
TARGETS = ("pred", "true")
METRICS = ("logit", "prob", "acc")


# --- predictor importance: LayerFeatureAblation on hook_pooled ------------------------------------


def sliced_probe_names() -> list[str]:
    """Registered probes whose predictors own disjoint columns of ``hook_pooled``."""
    return available(sliced=True, variants=False)


def _as_index(index: Iterable[int] | None) -> np.ndarray | None:
    """Sample positions as a contiguous int64 array (None stays None)."""
    return None if index is None else np.array(list(index) if not isinstance(index, np.ndarray) else index, dtype=np.int64)


def _layer_mask(probe: Probe, feature_mask: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """The (1, width) group of every pooled column: the probe's own mask, or a given one."""
    if feature_mask is None:
        mask = probe.feature_mask()
        if mask is None:
            raise ValueError(
                f"predictor_importance ablates each predictor's own columns of hook_pooled, but the predictors of "
                f"probe '{probe.name}' share their pooled columns (predictor_slices() holds None). Use a probe whose "
                f"predictors own disjoint slices ({', '.join(map(repr, sliced_probe_names()))}), or pass feature_mask="
            )
        return mask
    mask = torch.as_tensor(np.asarray(feature_mask))
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != (1, probe.width):
        raise ValueError(
            f"feature_mask must give a group to each of the {probe.width} pooled columns of probe '{probe.name}', "
            f"shape ({probe.width},) or (1, {probe.width}); got shape {tuple(mask.shape)}"
        )
    if mask.is_floating_point() or mask.dtype == torch.bool:
        raise ValueError(f"feature_mask must hold integer group ids (-1: in no group), got dtype {mask.dtype}")
    if (mask < -1).any() or not (mask >= 0).any():
        raise ValueError("feature_mask must hold group ids >= 0 (and -1 for columns in no group), with at least one group")
    return mask.long()


def _mean_features(probe: Probe, tokens: TokenSet, batch_size: int, index, device, precision: str) -> torch.Tensor:
    total: torch.Tensor | None = None
    seen = 0
    with eval_mode(probe):
        for batch in iter_batches(tokens, batch_size, device, index):
            with autocast(device, precision):
                y = probe.pooled(batch.patch, batch.prefix).float()
            total = y.sum(0) if total is None else total + y.sum(0)
            seen += len(y)
    if seen == 0:
        raise ValueError("predictor_importance got no samples to evaluate (empty index)")
    assert total is not None  # seen > 0: at least one batch was summed
    return (total / seen)[None]


def _layer_baseline(probe: Probe, baseline, tokens: TokenSet, batch_size: int, index, device, precision: str) -> torch.Tensor:
    """The (1, width) value an ablated column takes."""
    if isinstance(baseline, str):
        if baseline not in ABLATION_BASELINES:
            raise ValueError(
                f"baseline must be one of {ABLATION_BASELINES}, a number or a ({probe.width},) tensor; got {baseline!r}"
            )
        if baseline == "zero":
            return torch.zeros(1, probe.width, device=device)
        if baseline == "mean":
            return _mean_features(probe, tokens, batch_size, index, device, precision)
        running = getattr(probe.norm, "running_mean", None)
        if running is None:
            raise ValueError(f"probe '{probe.name}' keeps no BatchNorm running mean: use baseline='mean' or 'zero'")
        return running.detach().float()[None].to(device)
    value = torch.as_tensor(baseline, dtype=torch.float32, device=device)
    if value.ndim == 0:
        return value.expand(1, probe.width).clone()
    if value.numel() != probe.width:
        raise ValueError(
            f"a baseline tensor must hold one value per pooled column ({probe.width}); got shape {tuple(value.shape)}"
        )
    return value.reshape(1, probe.width)


def _metric_forward(probe: Probe, metric: str):
    """A forward returning one value per sample: the true-class logit, its probability, or correctness."""

    def forward(patch: torch.Tensor, prefix: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        logits = probe(patch, prefix).float()
        if metric == "acc":
            return (logits.argmax(dim=-1) == labels).float()
        scores = logits.softmax(dim=-1) if metric == "prob" else logits
        return scores.gather(1, labels[:, None])[:, 0]

    return forward


def predictor_importance(
    probe: Probe,
    tokens: TokenSet,
    *,
    context: Mapping | None = None,
    baseline: str | float | torch.Tensor = "running_mean",
    feature_mask: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> pd.DataFrame:
    """Importance of each predictor by ablating its slice of ``hook_pooled`` (captum LayerFeatureAblation).

    See the module docstring for the baseline and the three importance measures (our definitions).

    Args:
        probe: A trained attentive probe whose predictors own disjoint pooled columns.
        tokens: Evaluation tokens with labels.
        context: Values for the ``backbone``, ``layer``, ``probe``, ``seed`` columns (and extra
            columns); defaults come from the probe's name and ``tokens.origin``.
        baseline: "running_mean" (default), "mean", "zero", a number, or one value per pooled column.
        feature_mask: Groups of pooled columns ablated together, (width,) or (1, width) integers,
            -1 for columns in no group, which get no row (default: ``probe.feature_mask()``, one group
            per predictor).
        batch_size: Samples per batch.
        index: Optional subset of sample positions.
        device: Where to run; None picks automatically.
        precision: "fp32" or "bf16".
        progress: Show a tqdm bar over batches.

    Returns:
        One row per group (predictor): predictor, importance_logit, importance_prob,
        importance_acc, logit_full, prob_full, acc_full, acc_ablated, baseline, n_images.
    """
    table, _ = _importance_pass(probe, tokens, context, baseline, feature_mask, batch_size, index, device, precision, progress)
    return table


def _importance_pass(
    probe: Probe,
    tokens: TokenSet,
    context: Mapping | None,
    baseline: str | float | torch.Tensor,
    feature_mask: torch.Tensor | np.ndarray | None,
    batch_size: int,
    index: Iterable[int] | None,
    device: str | torch.device | None,
    precision: str,
    progress: bool,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """:func:`predictor_importance`'s table, and its per-image records: ``positions`` (n,) and, per
    metric, ``importance_<metric>`` (n, groups): each image's drop of the metric when a group is ablated."""
    from captum.attr import LayerFeatureAblation

    require_predictors(probe, "predictor_importance")
    check_labels(tokens.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    index = _as_index(index)
    mask = _layer_mask(probe, feature_mask)
    groups = sorted(int(g) for g in torch.unique(mask) if g >= 0)
    first = torch.tensor([int((mask[0] == g).nonzero()[0, 0]) for g in groups])  # one column per group
    device = prepare_probe(probe, device)
    base = _layer_baseline(probe, baseline, tokens, batch_size, index, device, precision)
    mask = mask.to(device)
    sums = {m: np.zeros(len(groups)) for m in METRICS}
    full = dict.fromkeys(METRICS, 0.0)
    per_image: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    positions: list[np.ndarray] = []
    seen = 0
    with eval_mode(probe):
        batches = iter_batches(tokens, batch_size, device, index)
        for batch in tqdm(batches, desc="predictor importance", disable=not progress, leave=False):
            with autocast(device, precision):
                for metric in METRICS:
                    forward = _metric_forward(probe, metric)
                    attr = LayerFeatureAblation(forward, probe.hook_pooled).attribute(
                        batch.patch,
                        layer_baselines=base.to(batch.patch.dtype),
                        additional_forward_args=(batch.prefix, batch.labels),
                        layer_mask=mask,
                    )
                    drops = attr[:, first.to(attr.device)].float().cpu().numpy()
                    per_image[metric].append(drops)
                    sums[metric] += drops.sum(0)
                    full[metric] += float(forward(batch.patch, batch.prefix, batch.labels).sum())
            positions.append(batch.index.cpu().numpy())
            seen += len(batch.labels)
    if seen == 0:
        raise ValueError("predictor_importance got no samples to evaluate (empty index)")
    label = baseline if isinstance(baseline, str) else "custom"
    rows = [
        dict(
            predictor=g,
            importance_logit=sums["logit"][i] / seen,
            importance_prob=sums["prob"][i] / seen,
            importance_acc=sums["acc"][i] / seen,
            logit_full=full["logit"] / seen,
            prob_full=full["prob"] / seen,
            acc_full=full["acc"] / seen,
            acc_ablated=(full["acc"] - sums["acc"][i]) / seen,
            baseline=label,
            n_images=seen,
        )
        for i, g in enumerate(groups)
    ]
    records = {"positions": np.concatenate(positions), **{f"importance_{m}": np.concatenate(per_image[m]) for m in METRICS}}
    return frame(rows, context_columns(context, probe, tokens)), records


def _context_keys(table: pd.DataFrame) -> list[str]:
    return [c for c in CONTEXT_KEYS if c in table.columns and table[c].notna().any()]


def join_importance(importance: pd.DataFrame, ablation: pd.DataFrame) -> pd.DataFrame:
    """One row per predictor with both the ablation importances and the uniform-ablation Δacc.

    Args:
        importance: Output of :func:`predictor_importance`.
        ablation: Output of :func:`~epviz.analysis.uniform_ablation` for the same probes.

    Raises:
        ValueError: Missing columns, or predictors present in only one of the tables.
    """
    for name, table, needed in (
        ("importance", importance, ["predictor", "importance_acc"]),
        ("ablation", ablation, ["predictor", "delta_acc"]),
    ):
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ValueError(
                f"the {name} table lacks the columns {missing}; pass the output of "
                f"{'predictor_importance' if name == 'importance' else 'uniform_ablation'}"
            )
    keys = [k for k in _context_keys(importance) if k in ablation.columns] + ["predictor"]
    right = ablation[keys + ["delta_acc", "acc_uniform"]]
    joined = importance.merge(right, on=keys, how="outer", indicator=True)
    unmatched = joined[joined["_merge"] != "both"]
    if len(unmatched):
        raise ValueError(
            f"{len(unmatched)} predictor rows appear in only one table (matched on {keys}); "
            "run both analyses on the same probes with the same context"
        )
    return joined.drop(columns="_merge")


def importance_vs_ablation(importance: pd.DataFrame, ablation: pd.DataFrame, column: str = "importance_acc") -> pd.DataFrame:
    """Spearman rank correlation across predictors between an ablation importance and Δacc.

    Args:
        importance: Output of :func:`predictor_importance`.
        ablation: Output of :func:`~epviz.analysis.uniform_ablation`.
        column: The importance compared: importance_acc, importance_prob or importance_logit.

    Returns:
        One row per probe (its context columns): predictors, rho, p_value (NaN when either
        ranking is constant), mean_importance, mean_delta_acc, column.
    """
    if column not in ("importance_acc", "importance_prob", "importance_logit"):
        raise ValueError(f"column must be importance_acc, importance_prob or importance_logit; got {column!r}")
    joined = join_importance(importance, ablation)
    keys = _context_keys(joined)
    rows = []
    for values, group in joined.groupby(keys, sort=False, dropna=False) if keys else [((), joined)]:
        values = values if isinstance(values, tuple) else (values,)
        rho, p = spearman(group[column].to_numpy(float), group["delta_acc"].to_numpy(float))
        rows.append(
            dict(
                zip(keys, values),
                predictors=len(group),
                rho=rho,
                p_value=p,
                mean_importance=float(group[column].mean()),
                mean_delta_acc=float(group["delta_acc"].mean()),
                column=column,
            )
        )
    return pd.DataFrame(rows)


class ImportanceRank(NamedTuple):
    """Result of :func:`importance_rank`: the two tables and their rank correlations with intervals."""

    importance: pd.DataFrame
    ablation: pd.DataFrame
    rank: pd.DataFrame


def importance_rank(
    probe: Probe,
    tokens: TokenSet,
    *,
    context: Mapping | None = None,
    baseline: str | float | torch.Tensor = "running_mean",
    columns: Sequence[str] = ("importance_acc", "importance_prob", "importance_logit"),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> ImportanceRank:
    """Predictor importance, uniform-ablation Δacc and their Spearman ρ across predictors, with bootstrap intervals.

    One pass of each analysis keeps every image's importance and every image's correctness with each
    predictor made uniform; a resample of the images (B = `n_boot`, as in :mod:`epviz.analysis.intervals`)
    recomputes both per-predictor means and ρ across the predictors, and the interval is the
    percentile interval of those ρ (resamples where ρ is undefined are left out and counted).

    Args:
        probe: A trained sliced attentive probe (its predictors own disjoint pooled columns).
        tokens: Evaluation tokens with labels.
        context: Values of the context columns.
        baseline: The importance's ablation baseline (see :func:`predictor_importance`).
        columns: The importances ranked against Δacc.
        n_boot, seed, level: Bootstrap resamples over images, their seed and the interval level.
        batch_size, index, device, precision: As in :func:`predictor_importance`.

    Returns:
        :func:`predictor_importance`'s table, :func:`~epviz.analysis.uniform_ablation`'s table, and one
        row per column of :func:`importance_vs_ablation` with ``rho_lo``, ``rho_hi`` and ``rho_undefined``.
    """
    from epviz.analysis.ablation import UniformAblation
    from epviz.analysis.intervals import bootstrap_weights, percentile_interval, weighted_mean
    from epviz.analysis.measure import measure

    unknown = [c for c in columns if c not in ("importance_acc", "importance_prob", "importance_logit")]
    if unknown:
        raise ValueError(f"columns must be among importance_acc, importance_prob, importance_logit; got {unknown}")
    importance, records = _importance_pass(probe, tokens, context, baseline, None, batch_size, index, device, precision, False)
    meter = UniformAblation()
    ablation = measure(
        probe, tokens, meters=[meter], index=index, batch_size=batch_size, device=device, precision=precision, context=context
    )
    positions = meter.positions()
    if positions is None or not np.array_equal(positions, records["positions"]):
        raise RuntimeError("the importance and the ablation pass saw different images")  # both stream the same index in order
    if list(importance["predictor"]) != list(meter.chosen):
        raise ValueError(
            "predictor_importance's groups are not the probe's predictors: importance_rank needs one group per predictor"
        )
    full, ablated = meter.image_correct()
    full, ablated = full.astype(np.float64), ablated.astype(np.float64)
    rows = []
    for column in columns:
        point = importance_vs_ablation(importance, ablation, column=column)
        rhos = []
        for weights in bootstrap_weights(len(full), n_boot, seed):
            drop = weighted_mean(weights, records[column])
            delta = weighted_mean(weights, full)[:, None] - weighted_mean(weights, ablated)
            rhos.append(row_spearman(drop, delta))
        rho = np.concatenate(rhos)
        lo, hi = percentile_interval(rho, level)
        rows.append(point.assign(rho_lo=float(lo), rho_hi=float(hi), rho_undefined=float(np.isnan(rho).mean()), level=level))
    return ImportanceRank(importance, ablation, pd.concat(rows, ignore_index=True))


# --- token attribution: IntegratedGradients on the patch tokens -----------------------------------


@dataclass
class TokenAttribution:
    """Per-token relevance from :func:`token_attribution`.

    Attributes:
        attributions: Signed relevance of every patch token, (n, N) float32 (IG summed over channels).
        index: Dataset positions of the n images.
        labels: True classes, (n,).
        targets: The class explained for each image, (n,).
        output_diff: ``f(x) - f(baseline)`` of the target logit, (n,).
        delta: captum's convergence delta, ``attributions.sum(-1) - output_diff``, (n,).
        baseline: The token baseline used.
        n_steps: Integration steps.
    """

    attributions: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    output_diff: np.ndarray
    delta: np.ndarray
    baseline: str
    n_steps: int

    def to_frame(self, context: Mapping | None = None) -> pd.DataFrame:
        """One row per image: image, label, target, output_diff, attribution_sum, delta, relative_delta."""
        total = self.attributions.astype(np.float64).sum(-1)
        rows = [
            dict(
                image=int(i),
                label=int(lab),
                target=int(t),
                output_diff=float(d),
                attribution_sum=float(s),
                delta=float(e),
                relative_delta=float(abs(e) / max(abs(d), 1e-12)),
            )
            for i, lab, t, d, s, e in zip(self.index, self.labels, self.targets, self.output_diff, total, self.delta)
        ]
        return frame(
            rows,
            context_columns(context),
            ["image", "label", "target", "output_diff", "attribution_sum", "delta", "relative_delta"],
        )


def _token_baseline(patch: torch.Tensor, baseline: str) -> torch.Tensor:
    if baseline == "zero":
        return torch.zeros_like(patch)
    return patch.mean(dim=1, keepdim=True).expand_as(patch).contiguous()


def _attribute_batch(probe: Probe, batch: TokenBatch, target: str, baseline: str, n_steps: int, internal_batch_size):
    from captum.attr import IntegratedGradients

    def forward(patch: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        return probe(patch, prefix).float()

    with torch.no_grad():
        logits = forward(batch.patch, batch.prefix)
    targets = batch.labels if target == "true" else logits.argmax(dim=-1)
    base = _token_baseline(batch.patch, baseline)
    attr, delta = IntegratedGradients(forward).attribute(
        batch.patch,
        baselines=base,
        target=targets,
        additional_forward_args=(batch.prefix,),
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        at_base = forward(base, batch.prefix).gather(1, targets[:, None])[:, 0]
    diff = logits.gather(1, targets[:, None])[:, 0] - at_base
    return attr.sum(-1).detach(), targets, diff, delta.detach()


def token_attribution(
    probe: Probe,
    tokens: TokenSet,
    *,
    target: str = "pred",
    baseline: str = "mean",
    n_steps: int = 32,
    batch_size: int = 32,
    internal_batch_size: int | None = None,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TokenAttribution:
    """Integrated Gradients (captum) of a class logit with respect to each patch token.

    Runs in fp32 with the probe in eval mode; see the module docstring for the definition.

    Args:
        probe: A trained probe (any probe: attention maps are not needed here).
        tokens: Tokens with labels.
        target: Class explained: "pred" (the probe's prediction) or "true" (the label).
        baseline: "mean" (the image's mean patch token everywhere) or "zero".
        n_steps: Integration steps of IG (captum's Gauss-Legendre rule).
        batch_size: Images per IG call; captum evaluates ``batch_size * n_steps`` token sets.
        internal_batch_size: Cap on the token sets captum evaluates at once (None: all).
        index: Optional subset of sample positions.
        device: Where to run; None picks automatically.
        progress: Show a tqdm bar over batches.
    """
    if not isinstance(probe, Probe):
        raise TypeError(f"token_attribution expects a Probe (see epviz.probes.build), got {type(probe).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if baseline not in TOKEN_BASELINES:
        raise ValueError(f"baseline must be one of {TOKEN_BASELINES}, got {baseline!r}")
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    index = _as_index(index)
    device = prepare_probe(probe, device)
    parts: dict[str, list] = {k: [] for k in ("attr", "index", "labels", "targets", "diff", "delta")}
    batches = iter_batches(tokens, batch_size, device, index)
    with eval_mode(probe, grad=True):  # BatchNorm running statistics, gradients for captum
        for batch in tqdm(batches, desc="integrated gradients", disable=not progress, leave=False):
            attr, targets, diff, delta = _attribute_batch(probe, batch, target, baseline, int(n_steps), internal_batch_size)
            for key, value in (
                ("attr", attr),
                ("index", batch.index),
                ("labels", batch.labels),
                ("targets", targets),
                ("diff", diff),
                ("delta", delta),
            ):
                parts[key].append(value.cpu().numpy())
    if not parts["attr"]:
        raise ValueError("token_attribution got no samples to explain (empty index)")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return TokenAttribution(
        cat["attr"].astype(np.float32),
        cat["index"].astype(np.int64),
        cat["labels"].astype(np.int64),
        cat["targets"].astype(np.int64),
        cat["diff"].astype(np.float64),
        cat["delta"].astype(np.float64),
        baseline,
        int(n_steps),
    )


# --- agreement between relevance and attention ----------------------------------------------------


def topk_overlap(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per row, the fraction of the k largest entries of `a` that are among the k largest of `b`."""
    ta = torch.as_tensor(np.asarray(a, dtype=np.float64)).topk(k, dim=-1).indices
    tb = torch.as_tensor(np.asarray(b, dtype=np.float64)).topk(k, dim=-1).indices
    hits = (ta[..., :, None] == tb[..., None, :]).any(-1).sum(-1)
    return (hits.double() / k).numpy()


def _reference_maps(maps: np.ndarray, predictors) -> list[tuple[str, np.ndarray]]:
    refs = [("mean", maps.mean(1))]
    if predictors is None:
        return refs
    chosen = range(maps.shape[1]) if isinstance(predictors, str) and predictors == "all" else predictors
    for j in chosen:
        j = int(j)
        if not 0 <= j < maps.shape[1]:
            raise ValueError(f"the maps have {maps.shape[1]} predictors (0..{maps.shape[1] - 1}); predictors got {j}")
        refs.append((f"predictor {j}", maps[:, j]))
    return refs


def attention_agreement(
    attributions: np.ndarray | torch.Tensor | TokenAttribution,
    maps: np.ndarray | torch.Tensor,
    *,
    k: int = 8,
    predictors: str | Sequence[int] | None = None,
    absolute: bool = False,
    context: Mapping | None = None,
    index: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Per image, how well token relevance agrees with attention: Spearman rho and top-k overlap.

    Args:
        attributions: (n, N) token relevance, or a :class:`TokenAttribution`.
        maps: (n, K, N) attention maps of the same images in the same order, or (n, N).
        k: Tokens in the top-k sets (1 <= k <= N).
        predictors: Besides the mean of the K maps ("mean"), compare with these predictors'
            own maps ("all" or a list of indices).
        absolute: Rank tokens by |relevance| instead of the signed relevance.
        context: Values of the context columns.
        index: Dataset positions of the images (default: those of a TokenAttribution, else 0..n-1).

    Returns:
        One row per image x map: image, map ("mean" or "predictor j"), spearman, topk_overlap,
        k, chance_overlap (k / N), num_tokens.
    """
    if isinstance(attributions, TokenAttribution):
        index = attributions.index if index is None else index
        attributions = attributions.attributions
    attr = np.asarray(attributions, dtype=np.float64)
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[:, None]
    if attr.ndim != 2 or maps.ndim != 3:
        raise ValueError(
            f"attributions must be (images, tokens) and maps (images, predictors, tokens); "
            f"got shapes {attr.shape} and {maps.shape}"
        )
    if attr.shape[0] != maps.shape[0] or attr.shape[1] != maps.shape[2]:
        raise ValueError(
            f"attributions {attr.shape} and maps {maps.shape} disagree: they need the same images "
            "(first axis) and the same tokens (last axis)"
        )
    if not np.isfinite(attr).all() or not np.isfinite(maps).all():
        raise ValueError("attributions and maps must be finite")
    n, num_tokens = attr.shape
    if not 1 <= int(k) <= num_tokens:
        raise ValueError(f"k must lie between 1 and the number of tokens ({num_tokens}), got {k}")
    k = int(k)
    index = np.arange(n) if index is None else np.asarray(list(index), dtype=np.int64)
    if index.shape != (n,):
        raise ValueError(f"index must give a position to each of the {n} images, got {len(index)}")
    relevance = np.abs(attr) if absolute else attr
    rows = []
    for name, ref in _reference_maps(maps, predictors):
        rho = row_spearman(relevance, ref)
        overlap = topk_overlap(relevance, ref, k)
        rows += [
            dict(
                image=int(i),
                map=name,
                spearman=float(r),
                topk_overlap=float(o),
                k=k,
                chance_overlap=k / num_tokens,
                num_tokens=num_tokens,
            )
            for i, r, o in zip(index, rho, overlap)
        ]
    return frame(rows, context_columns(context))


@dataclass
class AttributionComparison:
    """Result of :func:`attribution_vs_attention`.

    Attributes:
        table: The agreement table (see :func:`attention_agreement`) with the columns of
            :meth:`TokenAttribution.to_frame` (label, target, output_diff, delta, ...) joined per image.
        attribution: The token relevance.
        maps: The attention maps of the same images, (n, K, N), from a plain pass.
    """

    table: pd.DataFrame
    attribution: TokenAttribution
    maps: np.ndarray


def attribution_vs_attention(
    probe: Probe,
    tokens: TokenSet,
    *,
    context: Mapping | None = None,
    k: int = 8,
    predictors: str | Sequence[int] | None = None,
    absolute: bool = False,
    target: str = "pred",
    baseline: str = "mean",
    n_steps: int = 32,
    batch_size: int = 32,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AttributionComparison:
    """Integrated Gradients on the patch tokens, compared image by image with the attention maps.

    The maps come from :func:`~epviz.evaluate.collect_attention` in a separate plain pass:
    captum evaluates enlarged, interpolated batches, whose maps are not the images' own.

    Args:
        probe: A trained attentive probe.
        tokens: Tokens with labels.
        context: Values of the context columns (defaults: probe name, ``tokens.origin``).
        k: Tokens in the top-k sets.
        predictors: Also compare with single predictors' maps ("all" or indices).
        absolute: Rank tokens by |relevance|.
        target: Class explained: "pred" or "true".
        baseline: Token baseline of IG: "mean" or "zero".
        n_steps: Integration steps.
        batch_size: Images per IG call.
        index: Optional subset of sample positions.
        device: Where to run; None picks automatically.
        progress: Show a tqdm bar over batches.
    """
    require_predictors(probe, "attribution_vs_attention")
    index = _as_index(index)
    attribution = token_attribution(
        probe,
        tokens,
        target=target,
        baseline=baseline,
        n_steps=n_steps,
        batch_size=batch_size,
        index=index,
        device=device,
        progress=progress,
    )
    maps = collect_attention(probe, tokens, batch_size=max(batch_size, 256), index=attribution.index, device=device)
    ctx = context_columns(context, probe, tokens)
    table = attention_agreement(attribution, maps, k=k, predictors=predictors, absolute=absolute, context=ctx)
    per_image = attribution.to_frame().drop(columns=list(ctx))
    table = table.merge(per_image, on="image", how="left")
    return AttributionComparison(table, attribution, maps)
