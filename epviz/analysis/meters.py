"""Per-predictor measures as meters: one object per measure, fed one batch at a time.

A meter accumulates one measure of every attention predictor over a pass through the tokens:
:meth:`Meter.start` once, :meth:`Meter.update` per batch (the batch's attention maps and a
:class:`MeterBatch`), :meth:`Meter.summary` at the end (one row per predictor). Registered
meters (:func:`register_meter`) are picked up by :func:`~epviz.analysis.predictor_table`, by
the figures' axis labels (:func:`column_label`) and by the Explorer's table
(:func:`table_columns`). :func:`~epviz.analysis.measure` feeds many meters from one pass.

A new measure is one class::

    @register_meter("peak_mass")
    class PeakMass(Meter):
        columns = {"peak_mass": "largest token weight of the map"}

        def update(self, maps, batch): ...
        def summary(self): ...

A meter that keeps per-image records also implements :meth:`Meter.positions` and
:meth:`Meter.resample`; :mod:`epviz.analysis.intervals` then gives its columns bootstrap
intervals over the images (``<column>_lo`` / ``<column>_hi`` in the predictor table).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch

from epviz.analysis.boxes import box_source
from epviz.evaluate import ensure_finite
from epviz.probes import Probe
from epviz.runtime import autocast
from epviz.tokens import TokenBatch, TokenSet

__all__ = [
    "SUBSETS",
    "Meter",
    "MeterBatch",
    "column_label",
    "meter_class",
    "meter_names",
    "register_meter",
    "table_columns",
    "unregister_meter",
]

SUBSETS = ("index", "localization_index")
"""The image subsets of a pass: ``index`` (every measure) and ``localization_index`` (the costly ones)."""


@dataclass(frozen=True)
class MeterBatch:
    """One batch of a measuring pass, as the meters see it.

    Attributes:
        probe: The probe measured (in eval mode, gradients off).
        tokens: The batch's tokens on ``device``; ``tokens.index`` holds the dataset positions.
        dataset: The images' dataset with GT boxes, or None when the pass has none.
        device: Where the probe runs.
        precision: "fp32" or "bf16", for :meth:`autocast`.
    """

    probe: Probe
    tokens: TokenBatch
    dataset: Any = None
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @property
    def patch(self) -> torch.Tensor:
        """Patch tokens (b, N, D)."""
        return self.tokens.patch

    @property
    def prefix(self) -> torch.Tensor | None:
        """Prefix tokens (b, P, D), or None."""
        return self.tokens.prefix

    @property
    def labels(self) -> torch.Tensor:
        """Class indices (b,)."""
        return self.tokens.labels

    @property
    def index(self) -> np.ndarray:
        """Dataset positions of the batch's images (b,)."""
        return self.tokens.index.numpy()

    def __len__(self) -> int:
        return len(self.tokens.labels)

    def autocast(self):
        """The pass's precision context, for a meter that runs the probe itself."""
        return autocast(self.device, self.precision)

    def boxes(self) -> list[np.ndarray]:
        """Per image of the batch, its GT boxes (k, 4) xyxy pixels with exclusive x1, y1."""
        if self.dataset is None:
            raise ValueError("this meter needs GT boxes: pass the images' dataset to measure(probe, tokens, dataset)")

        boxes_of = box_source(self.dataset)
        return [boxes_of(int(i)) for i in self.index]


class Meter:
    """A per-predictor measure accumulated over batches of attention maps.

    Subclasses set the class attributes and implement :meth:`update` and :meth:`summary`;
    :meth:`start` is optional. Every option goes to the constructor, which must work without
    arguments (``measure`` builds registered meters by name). Every meter's :meth:`start`, its
    own included, first refuses tokens holding NaN or inf (:func:`epviz.evaluate.ensure_finite`:
    the whole set, scanned once for read-only sets), so no meter measures non-finite tokens.

    Attributes:
        name: The registry name (set by :func:`register_meter`).
        columns: Column of :meth:`summary` -> its axis label (the columns figures can plot).
        table_columns: The columns the Explorer's predictor table shows.
        needs_maps: False for a meter that ignores the maps (the pass then skips computing them
            when no other meter needs them); it then gets ``None``.
        subset: The images the meter measures: ``"index"`` or ``"localization_index"`` (the
            costly measures, possibly run on fewer images).
        order: Position of the meter's columns in the predictor table (lower first; equal
            orders keep the registration order).
        table_order: Position of its ``table_columns`` in the Explorer's table.
    """

    name: ClassVar[str] = ""
    columns: ClassVar[Mapping[str, str]] = {}
    table_columns: ClassVar[tuple[str, ...]] = ()
    needs_maps: ClassVar[bool] = True
    subset: ClassVar[str] = "index"
    order: ClassVar[float] = 100.0
    table_order: ClassVar[float] = 100.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own :meth:`start` first refuses NaN or inf tokens, as the base class's does."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("start")
        if own is None or getattr(own, "_refuses_nonfinite", False):
            return

        @functools.wraps(own)
        def start(self: Meter, probe: Probe, tokens: TokenSet, dataset: Any = None) -> None:
            _refuse_nonfinite(tokens)
            own(self, probe, tokens, dataset)

        setattr(start, "_refuses_nonfinite", True)  # noqa: B010 - an attribute of a function
        setattr(cls, "start", start)  # noqa: B010 - replaces the subclass's own method

    def start(self, probe: Probe, tokens: TokenSet, dataset: Any = None) -> None:
        """Prepare for a pass over `tokens` (check the inputs, size the accumulators); default: nothing
        but the check every meter makes first, that the tokens hold no NaN or inf.

        Args:
            probe: The probe measured.
            tokens: The tokens of the pass.
            dataset: The images' dataset with GT boxes, or None.

        Raises:
            DataError: The tokens hold NaN or inf.
        """
        _refuse_nonfinite(tokens)

    def update(self, maps: torch.Tensor | None, batch: MeterBatch) -> None:
        """Add a batch.

        Args:
            maps: The batch's attention maps, float32 (b, K, N) on the CPU (None when
                ``needs_maps`` is False and no other meter needs them).
            batch: The batch's probe, tokens and GT boxes.
        """
        raise NotImplementedError(f"meter {type(self).__name__} must implement update(maps, batch)")

    def summary(self) -> pd.DataFrame:
        """One row per predictor: column ``predictor`` first, then the meter's columns."""
        raise NotImplementedError(f"meter {type(self).__name__} must implement summary()")

    def positions(self) -> np.ndarray | None:
        """Dataset positions (n,) of the images whose per-image records the meter kept, in update order.

        None (the default) when the meter keeps no records and has no bootstrap intervals.
        """
        return None

    def resample(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Some of the meter's columns recomputed with weighted images, one row per resample.

        Args:
            weights: (b, n) non-negative image weights over the images of :meth:`positions`
                (bootstrap counts: each row sums to n).

        Returns:
            Column -> (b, P) values, P predictors in :meth:`summary` order (default: none).
        """
        return {}


def _refuse_nonfinite(tokens: Any) -> None:
    if isinstance(tokens, TokenSet):
        ensure_finite(tokens, "measured")


M = TypeVar("M", bound=type[Meter])
_REGISTRY: dict[str, type[Meter]] = {}


def register_meter(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`Meter` subclass under `name`.

    Raises:
        ValueError: The name is taken, or a table column is not among the meter's columns.
        TypeError: The class is not a Meter.
    """

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Meter)):
            raise TypeError(f"register_meter('{name}') decorates Meter subclasses, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(
                f"a meter named '{name}' is already registered ({_REGISTRY[name].__name__}); "
                "choose another name or unregister_meter it first"
            )
        if cls.subset not in SUBSETS:
            raise ValueError(f"meter '{name}': subset must be one of {SUBSETS}, got {cls.subset!r}")
        missing = [c for c in cls.table_columns if c not in cls.columns]
        if missing:
            raise ValueError(
                f"meter '{name}': table_columns {missing} are not in its columns {list(cls.columns)}; "
                "give each shown column an axis label in `columns`"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_meter(name: str) -> None:
    """Remove a registered meter (tests, interactive sessions)."""
    if name not in _REGISTRY:
        raise KeyError(f"no meter named '{name}' is registered; registered: {meter_names()}")
    del _REGISTRY[name]


def _ordered(key: str) -> list[type[Meter]]:
    return sorted(_REGISTRY.values(), key=lambda cls: getattr(cls, key))  # stable: ties keep registration order


def meter_names() -> list[str]:
    """Names of the registered meters, in predictor-table order."""
    return [cls.name for cls in _ordered("order")]


def meter_class(name: str) -> type[Meter]:
    """The meter class registered under `name`."""
    if name not in _REGISTRY:
        raise KeyError(f"no meter named '{name}' is registered; registered: {meter_names()}")
    return _REGISTRY[name]


def column_label(column: str) -> str | None:
    """The axis label a registered meter gives `column`, or None when no meter reports it."""
    for cls in _REGISTRY.values():
        if column in cls.columns:
            return cls.columns[column]
    return None


def table_columns() -> tuple[str, ...]:
    """The Explorer's predictor-table columns: ``predictor``, then every registered meter's ``table_columns``."""
    return ("predictor", *(c for cls in _ordered("table_order") for c in cls.table_columns))
