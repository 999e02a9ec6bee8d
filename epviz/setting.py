"""The notebooks' standard setting: dataset sizes, probe budgets, MaxBoxAccV2 thresholds, the probe set.

One frozen :class:`Setting` replaces the ``fast`` flag that used to travel through every call::

    setting = Setting.from_env()          # full, or fast when EPVIZ_FAST=1
    setting = Setting.full().replace(sizes={"train": 50_000, "val": 5_000, "test": None})   # custom

The standard sets (cluttered Fashion-MNIST by default):

========  ==========================  =========  ========
split     canvases                    full size  fast size
========  ==========================  =========  ========
train     Fashion-MNIST train, seed 0     20,000     2,000
val       Fashion-MNIST train, seed 1      2,000       500
test      Fashion-MNIST test,  seed 0      4,000       500
========  ==========================  =========  ========

``val`` holds other canvases of the training items (another seed) and selects the best epoch;
``test`` is only ever used for the numbers that are reported. For datasets on disk the sizes are
upper bounds (``None``: the whole split), spread evenly over the classes.

The standard probe budget (cached tokens, no augmentation): AdamW, linear warm-up then cosine
decay, best epoch on ``val``; 15 epochs (2 of warm-up) in batches of 256 under bf16 autocast, or in
fast mode 5 epochs (1 of warm-up) in batches of 64 in fp32 (more, smaller steps for the same compute
on the small training set). Low-shot runs get 100 epochs (10 of warm-up), or 40 (4) in fast mode,
since a few images make one step per epoch.

Probes are never compared at one shared learning rate: every probe gets the same tuning budget, a
grid of learning rates x weight decays (:attr:`Setting.grid`), trained together on one read of the
tokens and selected on ``val`` (:mod:`epviz.training.tuning`). :meth:`Setting.single_recipe` keeps
the former one-recipe budget (AdamW, lr 1e-3, weight decay 1e-4) and :meth:`Setting.paper` the
reference implementation's recipe (LARS, lr 0.1 x batch / 256, 90 epochs, 10 of warm-up, batch 4096,
no weight decay), for reproducing those protocols exactly.

Fast mode (``EPVIZ_FAST=1``) shrinks sizes and budgets so that every notebook runs in a minute or
two on a laptop CPU; its numbers are for checking the pipeline, not for reading.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from epviz.errors import ConfigError

__all__ = ["FAST_ENV", "GRID_KEYS", "SPLITS", "Setting", "THRESHOLDS", "check_grid", "check_grid_values"]

FAST_ENV = "EPVIZ_FAST"
SPLITS = ("train", "val", "test")
THRESHOLDS = np.round(np.arange(100) * 0.01, 2)  # MaxBoxAccV2 thresholds tau: 0, 0.01, ..., 0.99


GRID_KEYS = ("lrs", "weight_decays", "train_size")


def check_grid(grid: Mapping[str, Any]) -> dict[str, Any]:
    """A grid mapping with its keys checked and its values as tuples (``weight_decays`` default (1e-4,)).

    Raises:
        ConfigError: Unknown keys, no learning rates, or a ``train_size`` below 2.
    """
    if not isinstance(grid, Mapping):
        raise ConfigError(f"grid must be a mapping such as {{'lrs': (1e-3, 1e-2)}}, got {type(grid).__name__}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}; a grid takes {', '.join(GRID_KEYS)}")
    if "lrs" not in grid:
        raise ConfigError("a grid needs learning rates: grid={'lrs': (1e-3, 3e-3, 1e-2), ...}")
    lrs, weight_decays = check_grid_values(grid["lrs"], grid.get("weight_decays", (1e-4,)))
    out: dict[str, Any] = {
        "lrs": lrs,
        "weight_decays": weight_decays,
        "train_size": None if grid.get("train_size") is None else int(grid["train_size"]),
    }
    if out["train_size"] is not None and out["train_size"] < 2:
        raise ConfigError(f"grid train_size must be at least 2 images (None: the whole training set), got {out['train_size']}")
    return out


def check_grid_values(lrs: Any, weight_decays: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A grid's learning rates and weight decays as tuples of floats, checked.

    Raises:
        TypeError: A single number where a sequence is expected.
        ConfigError: An empty list, a value that is not a number, a learning rate <= 0, a negative weight
            decay, a value that is not finite, or a value listed twice.
    """
    out = []
    for name, values, example in (("lrs", lrs, "(1e-3, 3e-3, 1e-2)"), ("weight_decays", weight_decays, "(1e-4,)")):
        if isinstance(values, (int, float)):
            raise TypeError(f"{name} must be a sequence of numbers, e.g. {name}=({values},); got the single number {values}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ConfigError(f"{name} must be a sequence of numbers, e.g. {name}={example}; got {values!r}")
        floats = []
        for value in values:
            try:
                floats.append(float(value))
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must hold numbers, e.g. {name}={example}; got {value!r}") from None
        if not floats:
            what = "learning rate" if name == "lrs" else "weight decay"
            raise ConfigError(f"the grid is empty: pass at least one {what}, e.g. {name}={example}")
        out.append(tuple(floats))
    lr_values, wd_values = out
    bad = [x for x in lr_values if not (math.isfinite(x) and x > 0)]
    if bad:
        raise ConfigError(f"learning rates must be positive and finite; got {bad} in lrs={list(lr_values)}")
    bad = [x for x in wd_values if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ConfigError(f"weight decays must be >= 0 and finite; got {bad} in weight_decays={list(wd_values)}")
    for name, values in (("lrs", lr_values), ("weight_decays", wd_values)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{name}={list(values)} repeats a value; list each grid value once")
    return lr_values, wd_values


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Setting:
    """Sizes, budgets, thresholds and probe set shared by every notebook.

    Attributes:
        name: "full", "fast" or "custom" (any setting changed with :meth:`replace`).
        sizes: Images per split (train, val, test); None for a whole split of a dataset on disk.
        budget: :func:`epviz.fit` keyword arguments of a probe run.
        low_shot_budget: The same for low-shot runs.
        threshold_step: MaxBoxAccV2 uses every n-th threshold of 0, 0.01, ..., 0.99.
        grid: The tuning grid of every probe run: ``lrs``, ``weight_decays`` and ``train_size`` (the
            grid is trained on that many training images, then the chosen point is refit on all of
            them; None: on all); None: one run with the budget's own lr and weight decay.
        tune_low_shot: Whether low-shot runs are tuned with the grid too (without a subset; the first seed
            of every (shots, probe) trains the grid, the others reuse its choice); False runs
            them at the budget's own lr (the fast setting, whose low-shot runs check the pipeline only).
        probes: The probes "every probe" means; None: :func:`epviz.probes.standard_set` (every
            registered family, so a new family joins without an edit).
    """

    name: str = "full"
    sizes: Mapping[str, int | None] = field(default_factory=lambda: _frozen({"train": 20_000, "val": 2_000, "test": 4_000}))
    budget: Mapping[str, Any] = field(
        default_factory=lambda: _frozen(
            dict(epochs=15, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=2, precision="bf16")
        )
    )
    low_shot_budget: Mapping[str, Any] = field(
        default_factory=lambda: _frozen(
            dict(epochs=100, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=10, precision="bf16")
        )
    )
    threshold_step: int = 1
    probes: tuple[str, ...] | None = None
    grid: Mapping[str, Any] | None = field(
        default_factory=lambda: _frozen(
            {"lrs": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "weight_decays": (1e-4,), "train_size": 4_000}
        )
    )
    tune_low_shot: bool = True

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.sizes]
        if missing:
            raise ValueError(f"a setting needs a size for every split ({', '.join(SPLITS)}); missing: {', '.join(missing)}")
        bad = {s: v for s, v in self.sizes.items() if v is not None and int(v) < 1}
        if bad:
            raise ValueError(f"split sizes must be positive numbers of images (or None: the whole split), got {bad}")
        if int(self.threshold_step) < 1:
            raise ValueError(f"threshold_step must be a positive integer, got {self.threshold_step}")
        for attr in ("sizes", "budget", "low_shot_budget"):
            object.__setattr__(self, attr, _frozen(getattr(self, attr)))
        if self.grid is not None:
            object.__setattr__(self, "grid", _frozen(check_grid(self.grid)))
        if self.probes is not None:
            object.__setattr__(self, "probes", tuple(self.probes))

    @classmethod
    def full(cls) -> Setting:
        """The full standard setting (the numbers the README reports)."""
        return cls()

    @classmethod
    def fast(cls) -> Setting:
        """Small sizes and budgets for checking the pipeline (CI)."""
        return cls(
            name="fast",
            sizes={"train": 2_000, "val": 500, "test": 500},
            budget=dict(
                epochs=5, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=1, precision="fp32"
            ),
            low_shot_budget=dict(
                epochs=40, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=4, precision="fp32"
            ),
            threshold_step=4,
            probes=("cls", "gap", "ep16", "mhca", "simpool", "cbam"),
            grid={"lrs": (1e-3, 1e-2), "weight_decays": (1e-4,)},
            tune_low_shot=False,
        )

    @classmethod
    def single_recipe(cls) -> Setting:
        """The full sizes with one shared recipe for every probe (AdamW, lr 1e-3, weight decay 1e-4), no grid.

        One learning rate decides which probe wins (EP learns slowly at 1e-3); kept to reproduce
        earlier numbers, not for comparisons.
        """
        return cls(name="single-recipe", grid=None)

    @classmethod
    def paper(cls) -> Setting:
        """The reference implementation's recipe on cached tokens: LARS, lr 0.1 x batch / 256, 90 epochs
        (10 of warm-up), batch 4096, no weight decay, bf16; no grid.

        The reference runs it with the backbone on augmented images at every step (``epviz.fit_images``);
        on cached tokens it is a different, cheaper protocol.
        """
        recipe = dict(epochs=90, batch_size=4096, optimizer="lars", lr=None, weight_decay=0.0, warmup_epochs=10, precision="bf16")
        return cls(name="paper", budget=recipe, low_shot_budget=recipe, grid=None)

    @classmethod
    def from_env(cls) -> Setting:
        """:meth:`fast` when ``EPVIZ_FAST=1``, else :meth:`full`."""
        return cls.fast() if os.environ.get(FAST_ENV, "0") == "1" else cls.full()

    @property
    def is_fast(self) -> bool:
        """Whether this is the fast setting."""
        return self.name == "fast"

    def replace(self, **changes: Any) -> Setting:
        """A "custom" copy with some fields changed (``budget`` and ``low_shot_budget`` entries are merged)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown setting field(s) {unknown}; the fields are {[f.name for f in dataclasses.fields(self)]}")
        for key in ("budget", "low_shot_budget", "sizes"):
            if key in changes:
                changes[key] = {**getattr(self, key), **changes[key]}
        if isinstance(changes.get("grid"), Mapping) and self.grid is not None:
            changes["grid"] = {**self.grid, **changes["grid"]}
        changes.setdefault("name", "custom")
        return dataclasses.replace(self, **changes)

    def fit_options(self, **overrides: Any) -> dict[str, Any]:
        """The probe budget as keyword arguments of the training runs (overrides win).

        With a grid the options hold ``grid`` (and no ``lr`` / ``weight_decay``): the runs of
        :mod:`epviz.training.runs` then tune every probe (see :mod:`epviz.training.tuning`).
        """
        return self._options(self.budget, self.grid, overrides)

    def low_shot_options(self, **overrides: Any) -> dict[str, Any]:
        """The low-shot budget as keyword arguments of the training runs (overrides win); the grid without a subset."""
        grid = None if self.grid is None or not self.tune_low_shot else {**self.grid, "train_size": None}
        return self._options(self.low_shot_budget, grid, overrides)

    @staticmethod
    def _options(budget: Mapping[str, Any], grid: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
        options = dict(budget)
        if grid is not None:
            options.pop("lr", None)
            options.pop("weight_decay", None)
            options["grid"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in grid.items()}
        options.update(overrides)
        if options.get("grid") is None:
            options.pop("grid", None)
        return options

    @property
    def thresholds(self) -> np.ndarray:
        """MaxBoxAccV2 thresholds tau."""
        return THRESHOLDS[:: int(self.threshold_step)]

    def probe_set(self) -> list[str]:
        """The probes the notebooks compare: :attr:`probes`, or every registered family's standard name."""
        from epviz.probes import standard_set

        return list(self.probes) if self.probes is not None else standard_set()

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (printed by the notebooks)."""
        return {
            "name": self.name,
            "sizes": dict(self.sizes),
            "budget": dict(self.budget),
            "threshold_step": self.threshold_step,
            "probes": None if self.probes is None else list(self.probes),
            "grid": None if self.grid is None else dict(self.grid),
        }

    def sizes_of(self, splits: Sequence[str] = SPLITS) -> dict[str, int | None]:
        """Sizes of some splits."""
        unknown = [s for s in splits if s not in self.sizes]
        if unknown:
            raise ValueError(f"unknown splits {unknown}; the standard splits are {', '.join(SPLITS)}")
        return {s: self.sizes[s] for s in splits}
