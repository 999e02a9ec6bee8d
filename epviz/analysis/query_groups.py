"""Complementary maps: how much the attention predictors overlap, and groups of them.

Definitions (ours):

* **Overlap** of predictors i and j on one image is the histogram intersection of their
  maps, ``sum_t min(a_i[t], a_j[t])`` (maps renormalised to sum 1): 1 when the maps are
  identical, 0 when they attend to disjoint tokens. ``metric="cosine"`` uses the cosine
  similarity of the two maps instead. The overlap matrix (K, K) is the mean over images.
* **Groups**: agglomerative clustering (scikit-learn, average linkage) of the K predictors
  with the distance ``1 - overlap`` of the mean overlap matrix. Groups are numbered in the
  order of their lowest predictor index.
* **Group map** of an image: the sum of its members' maps (a distribution over the tokens
  scaled by the group size; divide by ``group_size`` for the average).
* **Group contrast** (:func:`group_contrast`): per image, the mean overlap of the pairs of
  predictors in the same group (``within``) and of the pairs in different groups (``between``),
  averaged over images, with 95% bootstrap intervals over images for both and for their
  difference. Groups are chosen to make ``within`` large on the images they were fitted on, so
  the contrast means something only on other images: notebook 05 fits the groups on half of the
  test images and measures the contrast on the other half.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from epviz.analysis._common import context_columns, frame, prepare_probe, require_predictors
from epviz.evaluate import attention_maps, collect_attention
from epviz.probes import Probe
from epviz.tokens import TokenSet

__all__ = ["METRICS", "QueryGroups", "group_contrast", "group_maps", "group_queries", "pairwise_overlap", "query_groups"]

METRICS = ("intersection", "cosine")


def _as_maps(maps) -> torch.Tensor:
    m = torch.as_tensor(maps, dtype=torch.float64)
    if m.ndim != 3:
        raise ValueError(f"maps must be (images, predictors, tokens), got shape {tuple(m.shape)}")
    if (m < 0).any() or not torch.isfinite(m).all():
        raise ValueError("maps must be non-negative and finite")
    return m


def _overlap_sum(maps: torch.Tensor, metric: str) -> torch.Tensor:
    """Sum over images of the per-image (K, K) overlap."""
    if metric == "cosine":
        unit = torch.nn.functional.normalize(maps, dim=-1)
        return torch.einsum("bin,bjn->ij", unit, unit)
    p = maps / maps.sum(-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    k = p.shape[1]
    out = torch.empty(k, k, dtype=p.dtype)
    for i in range(k):  # (B, K, N) at a time, not (B, K, K, N)
        out[i] = torch.minimum(p[:, i : i + 1], p).sum(-1).sum(0)
    return out


def pairwise_overlap(maps: np.ndarray | torch.Tensor, metric: str = "intersection") -> np.ndarray:
    """Mean over images of the (K, K) overlap between the predictors' maps.

    Args:
        maps: (n, K, N) maps.
        metric: "intersection" (histogram intersection) or "cosine".
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    m = _as_maps(maps)
    if len(m) == 0:
        raise ValueError("no maps given")
    return (_overlap_sum(m, metric) / len(m)).numpy()


def group_queries(overlap: np.ndarray, n_groups: int) -> np.ndarray:
    """Group labels (K,) of the predictors from their (K, K) mean overlap (average linkage on 1 - overlap).

    Groups are numbered 0.. in the order of their lowest predictor index.
    """
    overlap = np.asarray(overlap, dtype=np.float64)
    k = overlap.shape[0]
    if overlap.shape != (k, k):
        raise ValueError(f"overlap must be a square (K, K) matrix, got shape {overlap.shape}")
    if not 1 <= int(n_groups) <= k:
        raise ValueError(f"n_groups must be between 1 and the number of predictors ({k}), got {n_groups}")
    if int(n_groups) == k:
        return np.arange(k)
    if int(n_groups) == 1:
        return np.zeros(k, dtype=np.int64)
    distance = np.clip(1.0 - (overlap + overlap.T) / 2, 0, None)
    np.fill_diagonal(distance, 0.0)
    from sklearn.cluster import AgglomerativeClustering  # imported here: it costs ~0.8 s at `import epviz`

    raw = AgglomerativeClustering(n_clusters=int(n_groups), metric="precomputed", linkage="average").fit_predict(distance)
    order = {g: i for i, g in enumerate(dict.fromkeys(raw.tolist()))}  # first appearance = lowest member
    return np.array([order[g] for g in raw], dtype=np.int64)


def group_maps(maps: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per image, the sum of each group's member maps: (n, G, N) from (n, K, N) maps and (K,) labels."""
    m = _as_maps(maps)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (m.shape[1],):
        raise ValueError(f"labels must give a group to each of the {m.shape[1]} predictors, got shape {labels.shape}")
    g = int(labels.max()) + 1
    onehot = torch.zeros(m.shape[1], g, dtype=m.dtype)
    onehot[torch.arange(m.shape[1]), torch.from_numpy(labels)] = 1.0
    return torch.einsum("bkn,kg->bgn", m, onehot).float().numpy()


@dataclass
class QueryGroups:
    """Result of :func:`query_groups`.

    Attributes:
        overlap: Mean (K, K) overlap between predictors.
        labels: Group of each predictor, (K,).
        pairs: Tidy table, one row per pair i < j: predictor_a, predictor_b, overlap, same_group.
        assignment: One row per predictor: predictor, group, group_size, within_overlap (mean
            overlap with the other members, NaN for a singleton), between_overlap (mean
            overlap with the predictors of other groups).
        index: Dataset positions of the images in `maps`.
        maps: Group maps of those images, (len(index), G, N).
        metric: The overlap measure.
    """

    overlap: np.ndarray
    labels: np.ndarray
    pairs: pd.DataFrame
    assignment: pd.DataFrame
    index: np.ndarray
    maps: np.ndarray
    metric: str

    @property
    def num_groups(self) -> int:
        """Number of groups G."""
        return int(self.labels.max()) + 1

    def group_maps(self, maps: np.ndarray | torch.Tensor) -> np.ndarray:
        """Group maps (n, G, N) of any (n, K, N) maps of the same probe."""
        return group_maps(maps, self.labels)


def _tables(overlap: np.ndarray, labels: np.ndarray, ctx: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    k = len(labels)
    i, j = np.triu_indices(k, 1)
    pairs = [
        dict(predictor_a=int(a), predictor_b=int(b), overlap=float(overlap[a, b]), same_group=bool(labels[a] == labels[b]))
        for a, b in zip(i, j)
    ]
    rows = []
    for q in range(k):
        same = (labels == labels[q]) & (np.arange(k) != q)
        other = labels != labels[q]
        rows.append(
            dict(
                predictor=q,
                group=int(labels[q]),
                group_size=int((labels == labels[q]).sum()),
                within_overlap=float(overlap[q, same].mean()) if same.any() else float("nan"),
                between_overlap=float(overlap[q, other].mean()) if other.any() else float("nan"),
            )
        )
    columns = ["predictor_a", "predictor_b", "overlap", "same_group"]
    return frame(pairs, ctx, columns), frame(rows, ctx)


def query_groups(
    probe: Probe,
    tokens: TokenSet,
    n_groups: int = 4,
    *,
    metric: str = "intersection",
    maps_index: Iterable[int] | None = None,
    index: Iterable[int] | None = None,
    context: Mapping | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> QueryGroups:
    """Overlap between a probe's predictors over a dataset, their groups, and group maps.

    Args:
        probe: A trained attentive probe.
        tokens: The tokens whose maps are compared (streamed in batches).
        n_groups: Number of groups (at most K).
        metric: "intersection" or "cosine" (see the module docstring).
        maps_index: Images whose group maps are returned (default: the first 16).
        index: Optional subset of sample positions used for the overlap.
        context: Values of the context columns of the tables.
        batch_size: Samples per batch.
        device: Where to run; None picks automatically.
        precision: "fp32" or "bf16".
    """
    require_predictors(probe, "query_groups")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = probe.num_predictors
    if not 1 <= int(n_groups) <= k:
        raise ValueError(f"n_groups must be between 1 and the number of predictors ({k}) of probe '{probe.name}', got {n_groups}")
    device = prepare_probe(probe, device)
    total, n = torch.zeros(k, k, dtype=torch.float64), 0
    for _, maps in attention_maps(probe, tokens, batch_size, index, device, precision):
        m = _as_maps(maps)
        total += _overlap_sum(m, metric)
        n += len(m)
    if n == 0:
        raise ValueError("query_groups got no images (empty index)")
    overlap = (total / n).numpy()
    labels = group_queries(overlap, n_groups)
    maps_index = np.arange(min(16, len(tokens))) if maps_index is None else np.asarray(list(maps_index), dtype=np.int64)
    maps = collect_attention(probe, tokens, batch_size, maps_index, device, precision)
    pairs, assignment = _tables(overlap, labels, context_columns(context, probe, tokens))
    return QueryGroups(
        overlap=overlap,
        labels=labels,
        pairs=pairs,
        assignment=assignment,
        index=maps_index,
        maps=group_maps(maps, labels),
        metric=metric,
    )


def _image_overlaps(maps: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-image (n, K, K) overlap."""
    if metric == "cosine":
        unit = torch.nn.functional.normalize(maps, dim=-1)
        return torch.einsum("bin,bjn->bij", unit, unit)
    p = maps / maps.sum(-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    return torch.stack([torch.minimum(p[:, i : i + 1], p).sum(-1) for i in range(p.shape[1])], dim=1)


def group_contrast(
    maps: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int],
    *,
    metric: str = "intersection",
    context: Mapping | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Overlap of predictors in the same group against predictors of different groups, per image, with intervals.

    Args:
        maps: (n, K, N) maps of the images measured (best: images the groups were not fitted on).
        labels: Group of each predictor, (K,) (e.g. :attr:`QueryGroups.labels`).
        metric: "intersection" or "cosine".
        context: Values of the context columns.
        n_boot, seed, level: Bootstrap resamples over images, their seed and the interval level.

    Returns:
        One row: within, between, difference (within - between), each with ``_lo`` / ``_hi``,
        n_images, pairs_within, pairs_between, metric. ``within`` is NaN when every group is a singleton.
    """
    from epviz.analysis.intervals import bootstrap_mean

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    m = _as_maps(maps)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape != (m.shape[1],):
        raise ValueError(f"labels must give a group to each of the {m.shape[1]} predictors, got shape {labels.shape}")
    if len(m) == 0:
        raise ValueError("group_contrast got no images")
    k = len(labels)
    off = ~np.eye(k, dtype=bool)
    same = (labels[:, None] == labels[None, :]) & off
    other = labels[:, None] != labels[None, :]
    per_image = torch.cat([_image_overlaps(m[i : i + 256], metric) for i in range(0, len(m), 256)]).numpy()
    row: dict = {}
    values = {
        "within": per_image[:, same].mean(1) if same.any() else None,
        "between": per_image[:, other].mean(1) if other.any() else None,
    }
    if values["within"] is not None and values["between"] is not None:
        values["difference"] = values["within"] - values["between"]
    for name in ("within", "between", "difference"):
        v = values.get(name)
        interval = bootstrap_mean(v, n_boot, seed, level) if v is not None else None
        row[name] = float("nan") if interval is None else interval.estimate
        row[f"{name}_lo"] = float("nan") if interval is None else interval.lo
        row[f"{name}_hi"] = float("nan") if interval is None else interval.hi
    row.update(n_images=len(m), pairs_within=int(same.sum()) // 2, pairs_between=int(other.sum()) // 2, metric=metric)
    return frame([row], context_columns(context))
