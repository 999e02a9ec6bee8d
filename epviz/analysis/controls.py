"""Controls of the uniform ablation: three more interventions on one predictor, all else unchanged.

Definitions (ours): for predictor j, ``delta_acc_<control>_j = acc(full) - acc(predictor j
under <control>)``, top-1 accuracy on the measured tokens, beside the paper's uniform
replacement (:mod:`epviz.analysis.ablation`, column ``delta_acc``):

* **mean** (``delta_acc_mean``): predictor j's distribution over the patch tokens is replaced
  by its mean map over the *training* images (:func:`mean_attention_rows`), the same map for
  every test image. It needs training tokens (``train_tokens=``) or precomputed maps
  (``mean_maps=``); the test images are never used for it, and without either the columns are
  NaN. For self-attention heads (dinovit) the mean is taken per query row, so the head's map
  (the mean over rows) becomes its mean training map.
* **shuffled** (``delta_acc_shuffled``): predictor j's distribution is replaced by that of
  another test image: a fixed derangement of all the images of the token set, one random cycle
  drawn with ``numpy.random.default_rng(seed)`` (:func:`derangement`), so no image keeps its
  own map and the partner does not depend on the batch size or on the measured subset.
* **zero** (``delta_acc_zero``): predictor j's columns of the pooled feature are set to 0 before
  the BatchNorm (sliced probes only: each predictor alone produces its columns,
  ``probe.predictor_slices()``); NaN for probes whose predictors share every column.

Replacement follows the probe's routing (:meth:`~epviz.probes.Probe.ablated_logits` with
``control="replace"``): a predictor that also attends to non-patch keys keeps that mass and
puts ``map * patch_mass`` on the patch tokens; a spatial map ``w`` becomes ``map * sum(w)``.
Zero ablation is known to overstate a component's role (0 lies outside what the classifier
saw), while the mean and the shuffled map keep the feature on the data's range; a Δacc ranking
is worth reading only where the controls agree.

Cost: EP computes every control for all M queries in one more pooled pass
(``probe.fast_ablation``); other probes run one forward per predictor and control; the
shuffled control also computes the partner images' maps (one more attention pass per batch).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from epviz.analysis._common import prepare_probe, require_predictors
from epviz.analysis.ablation import AblationMeter, ablated_logits
from epviz.analysis.meters import MeterBatch, register_meter
from epviz.evaluate import eval_mode
from epviz.probes import Probe
from epviz.runtime import autocast
from epviz.tokens import TokenSet

__all__ = ["CONTROL_COLUMNS", "MeanMapAblation", "ShuffledAblation", "ZeroAblation", "derangement", "mean_attention_rows"]

CONTROL_COLUMNS = {"uniform": "delta_acc", "mean": "delta_acc_mean", "shuffled": "delta_acc_shuffled", "zero": "delta_acc_zero"}
"""Control -> its Δacc column in the predictor table."""


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation without fixed points: image ``order[t]`` gets partner ``order[t + 1]`` (cyclic).

    Args:
        n: Number of images (at least 2).
        seed: Seed of ``numpy.random.default_rng``; ``order`` is its permutation of ``range(n)``.

    Returns:
        ``partner`` (n,) with ``partner[i] != i``.
    """
    if n < 2:
        raise ValueError(f"a shuffled map needs another image: got {n} image(s)")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def mean_attention_rows(
    probe: Probe,
    tokens: TokenSet,
    *,
    batch_size: int = 256,
    index: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Each predictor's mean distribution over the patch tokens across images, shape (K, R, N), float32 on the CPU.

    R is 1, or N for self-attention heads (one mean per query row); see
    :meth:`~epviz.probes.Probe.attention_rows`. Pass *training* tokens: this is the mean map
    of the ``mean`` control.

    Args:
        probe: An attentive probe.
        tokens: The images to average over.
        batch_size: Images per batch.
        index: Optional subset of images.
        device: Where to run; None picks automatically.
        precision: "fp32" or "bf16".
    """
    require_predictors(probe, "mean_attention_rows")
    device = prepare_probe(probe, device)
    positions = np.arange(len(tokens)) if index is None else np.asarray(list(index), dtype=np.int64)
    if len(positions) == 0:
        raise ValueError("mean_attention_rows got no images to average over")
    parts = []
    with eval_mode(probe), autocast(device, precision):
        for start in range(0, len(positions), batch_size):
            batch = tokens.batch(positions[start : start + batch_size], device=device)
            parts.append(probe.attention_rows(batch.patch, batch.prefix).double().sum(0))
    return (torch.stack(parts).sum(0) / len(positions)).float().cpu()


@register_meter("mean_map_ablation")
class MeanMapAblation(AblationMeter):
    """Δacc when a predictor's map is replaced by its mean map over the training images.

    Args:
        mean_maps: Precomputed mean maps (K, R, N) or (K, N) (:func:`mean_attention_rows` of
            the training tokens).
        train_tokens: Training tokens to compute them from at the start of the pass (never the
            measured test tokens).
        batch_size: Images per batch for that computation.
        method: See :func:`~epviz.analysis.ablated_logits`.
        predictors: Only report these predictors (default: all K).
    """

    columns = {
        "delta_acc_mean": "Δacc (predictor's mean training map)",
        "acc_mean": "top-1 accuracy with the predictor's map replaced by its mean training map",
    }
    table_columns = ("delta_acc_mean",)
    control = "mean"
    order = 30.0
    table_order = 0.1

    def __init__(
        self,
        mean_maps: torch.Tensor | np.ndarray | None = None,
        train_tokens: TokenSet | None = None,
        *,
        batch_size: int = 256,
        method: str = "auto",
        predictors: Iterable[int] | None = None,
    ) -> None:
        super().__init__(method, predictors)
        if mean_maps is not None and train_tokens is not None:
            raise ValueError("pass either mean_maps= or train_tokens=, not both")
        self.mean_maps = None if mean_maps is None else torch.as_tensor(np.asarray(mean_maps), dtype=torch.float32)
        self.train_tokens = train_tokens
        self.batch_size = int(batch_size)
        self._maps: torch.Tensor | None = None

    def _unsupported(self, probe: Probe, tokens: TokenSet) -> str | None:
        self._maps = None
        if self.mean_maps is None and self.train_tokens is None:
            return "no training images: pass train_tokens= or mean_maps= (the mean map never uses the test images)"
        if self.train_tokens is tokens:
            raise ValueError("train_tokens is the token set being measured: the mean map must come from the training images")
        if self.mean_maps is not None:
            self._maps = self._shaped(self.mean_maps, probe, tokens.num_tokens)
        return None

    def _shaped(self, maps: torch.Tensor, probe: Probe, n: int) -> torch.Tensor:
        maps = maps.unsqueeze(1) if maps.ndim == 2 else maps
        if maps.ndim != 3 or maps.shape[0] != probe.num_predictors or maps.shape[-1] != n:
            raise ValueError(f"mean_maps must be (K={probe.num_predictors}, R, N={n}) or (K, N); got {tuple(maps.shape)}")
        return maps

    def _logits(self, batch: MeterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self._maps is None:
            assert self.train_tokens is not None  # _unsupported set the reason otherwise
            self._maps = self._shaped(
                mean_attention_rows(
                    batch.probe, self.train_tokens, batch_size=self.batch_size, device=batch.device, precision=batch.precision
                ),
                batch.probe,
                batch.patch.shape[1],
            )
        replacement = self._maps.to(batch.device).unsqueeze(0)  # (1, K, R, N): the same maps for every image
        return ablated_logits(batch.probe, batch, self.method, "replace", replacement)


@register_meter("shuffled_ablation")
class ShuffledAblation(AblationMeter):
    """Δacc when a predictor's map is replaced by the same predictor's map on another test image.

    Args:
        seed: Seed of the derangement of the token set's images (:func:`derangement`).
        method: See :func:`~epviz.analysis.ablated_logits`.
        predictors: Only report these predictors (default: all K).
    """

    columns = {
        "delta_acc_shuffled": "Δacc (another image's map)",
        "acc_shuffled": "top-1 accuracy with the predictor's map taken from another image",
    }
    table_columns = ("delta_acc_shuffled",)
    control = "shuffled"
    order = 31.0
    table_order = 0.2

    def __init__(self, seed: int = 0, *, method: str = "auto", predictors: Iterable[int] | None = None) -> None:
        super().__init__(method, predictors)
        self.seed = int(seed)
        self.partner = np.zeros(0, dtype=np.int64)
        self.tokens: TokenSet | None = None

    def _unsupported(self, probe: Probe, tokens: TokenSet) -> str | None:
        if len(tokens) < 2:
            return "a shuffled map needs at least two images"
        self.partner, self.tokens = derangement(len(tokens), self.seed), tokens
        return None

    def _logits(self, batch: MeterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tokens is not None  # set by start()
        other = self.tokens.batch(self.partner[batch.index], device=batch.device)
        rows = batch.probe.attention_rows(other.patch, other.prefix)  # (b, K, R, N) of the partner images
        return ablated_logits(batch.probe, batch, self.method, "replace", rows)


@register_meter("zero_ablation")
class ZeroAblation(AblationMeter):
    """Δacc when a predictor's columns of the pooled feature are set to 0 (sliced probes; NaN for the others).

    Args:
        method: See :func:`~epviz.analysis.ablated_logits`.
        predictors: Only report these predictors (default: all K).
    """

    columns = {
        "delta_acc_zero": "Δacc (predictor's pooled slice zeroed)",
        "acc_zero": "top-1 accuracy with the predictor's pooled slice zeroed",
    }
    table_columns = ("delta_acc_zero",)
    control = "zero"
    order = 32.0
    table_order = 0.3

    def _unsupported(self, probe: Probe, tokens: TokenSet) -> str | None:
        return probe.control_support("zero")

    def _logits(self, batch: MeterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return ablated_logits(batch.probe, batch, self.method, "zero")
