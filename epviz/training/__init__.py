"""Training probes: on cached tokens (:func:`fit`, :func:`fit_grid`), or per step through the backbone (:func:`fit_images`).

* :mod:`~epviz.training.engine`: the one training loop every trainer feeds (K stacked heads, schedule,
  divergence, best epoch, early stopping, checkpoint and resume, distributed weighting).
* :mod:`~epviz.training.stack`: K heads of one family as one module (hand-stacked, vmap or loop).
* :mod:`~epviz.training.fit`: :func:`fit` (a stack of one head) and :class:`FitResult` (best epoch on val, tidy history).
* :mod:`~epviz.training.grid`: :func:`fit_grid`, a stack of lrs x weight decays (x seeds) selected on val.
* :mod:`~epviz.training.fit_images`: the reference per-step protocol.
* :mod:`~epviz.training.optim`: LARS, AdamW, SGD over stacked heads, warm-up + cosine.
* :mod:`~epviz.training.checkpoints`: saved probes (safetensors + JSON with a model card).
* :mod:`~epviz.training.reference`: the reference implementation's EP, ep_all and LP heads, read and written.
* :mod:`~epviz.training.probe_cache`: trained probes cached on disk, keyed like the token cache.
* :mod:`~epviz.training.runs`: many trainings in one table (probe zoo, layer sweep, low-shot).
"""

from epviz.training.checkpoints import load_probe, read_model_card, save_probe
from epviz.training.fit import PROTOCOL, FitResult, fit
from epviz.training.fit_images import PROTOCOL_PER_STEP, fit_images
from epviz.training.grid import GridResult, fit_grid, select_point
from epviz.training.optim import LARS, lr_at
from epviz.training.probe_cache import grid_points
from epviz.training.reference import load_reference_head, save_reference_head
from epviz.training.runs import (
    aggregate_runs,
    build_for,
    layer_sweep,
    low_shot,
    probe_zoo,
    sample_per_class,
    seed_summary,
    train_probe,
)
from epviz.training.stack import HeadStack
from epviz.training.tuning import tune

__all__ = [
    "LARS",
    "PROTOCOL",
    "PROTOCOL_PER_STEP",
    "FitResult",
    "HeadStack",
    "aggregate_runs",
    "build_for",
    "fit",
    "fit_images",
    "grid_points",
    "layer_sweep",
    "load_probe",
    "load_reference_head",
    "low_shot",
    "lr_at",
    "probe_zoo",
    "read_model_card",
    "sample_per_class",
    "save_probe",
    "save_reference_head",
    "seed_summary",
    "train_probe",
    "GridResult",
    "fit_grid",
    "select_point",
    "tune",
]
