"""The notebooks' standard setting: dataset sizes, probe budgets, MaxBoxAccV2 thresholds, the probe set.

One frozen :class:`Setting` replaces the ``fast`` flag that used to travel through every call::

    setting = Setting.fast() if FAST else Setting.full()   # a notebook's parameters cell
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
decay, best epoch on ``val``; 15 epochs (2 of warm-up) in batches of 256, under bf16 autocast where the
device computes bf16 natively and in fp32 elsewhere (``precision="auto"``), or in
fast mode 5 epochs (1 of warm-up) in batches of 64 in fp32 (more, smaller steps for the same compute
on the small training set). Low-shot runs get 100 epochs (10 of warm-up), or 40 (4) in fast mode,
since a few images make one step per epoch.

Probes are never compared at one shared learning rate: every probe gets the same tuning budget, a
grid of learning rates x weight decays (:attr:`Setting.grid`), trained together on one read of the
tokens and selected on ``val`` (:mod:`epviz.training.tuning`). :meth:`Setting.single_recipe` keeps
the former one-recipe budget (AdamW, lr 1e-3, weight decay 1e-4) and :meth:`Setting.paper` the
reference implementation's recipe (LARS, lr 0.1 x batch / 256, 90 epochs, 10 of warm-up, batch 4096,
no weight decay), for reproducing those protocols exactly.

Fast mode (``Setting.fast()``; ``FAST = True`` in a notebook's parameters cell) shrinks sizes and budgets so that every notebook runs in a minute or
two on a laptop CPU; its numbers are for checking the pipeline, not for reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

import numpy as np

from epviz.checks import check_int, check_sequence, non_negative, positive
from epviz.errors import ConfigError

__all__ = [
    "BUDGET_KEYS",
    "GRID_KEYS",
    "PRESETS",
    "SPLITS",
    "Setting",
    "THRESHOLDS",
    "check_grid",
    "check_grid_values",
]

SPLITS = ("train", "val", "test")
THRESHOLDS = np.round(np.arange(100) * 0.01, 2)  # MaxBoxAccV2 thresholds tau: 0, 0.01, ..., 0.99


GRID_KEYS = ("lrs", "weight_decays", "train_size")
# the options a budget may set: epviz.fit's keyword arguments other than the run's own (seed, device, progress)
BUDGET_KEYS = (
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "early_stopping", "precision"
)  # fmt: skip


def check_grid(grid: Mapping[str, Any]) -> dict[str, Any]:
    """A grid mapping with its keys checked and its values as tuples (``weight_decays`` default (1e-4,)).

    Raises:
        ConfigError: Unknown keys, no learning rates, or a ``train_size`` that is not an integer >= 2.
    """
    if not isinstance(grid, Mapping):
        raise ConfigError(f"grid must be a mapping such as {{'lrs': (1e-3, 1e-2)}}, got {type(grid).__name__}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}; a grid takes {', '.join(GRID_KEYS)}")
    if "lrs" not in grid:
        raise ConfigError("a grid needs learning rates: grid={'lrs': (1e-3, 3e-3, 1e-2), ...}")
    lrs, weight_decays = check_grid_values(grid["lrs"], grid.get("weight_decays", (1e-4,)))
    size = grid.get("train_size")
    train_size = None if size is None else check_int("grid train_size (images; None: the whole training set)", size, 2)
    return {"lrs": lrs, "weight_decays": weight_decays, "train_size": train_size}


def check_grid_values(lrs: Any, weight_decays: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A grid's learning rates and weight decays as tuples of floats, checked.

    Raises:
        ConfigError: Not a sequence (or a single number), an empty one, a value that is not a number (a bool
            included), a learning rate <= 0, a negative weight decay, a value that is not finite, or a
            value listed twice.
    """
    return (
        check_sequence("lrs", lrs, positive, unique=True, example="(1e-3, 3e-3, 1e-2)"),
        check_sequence("weight_decays", weight_decays, non_negative, unique=True, example="(1e-4,)"),
    )


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


_FULL: dict[str, Any] = dict(
    sizes={"train": 20_000, "val": 2_000, "test": 4_000},
    budget=dict(epochs=15, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=2, precision="auto"),
    low_shot_budget=dict(
        epochs=100, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=10, precision="auto"
    ),
    threshold_step=1,
    probes=None,
    grid={"lrs": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "weight_decays": (1e-4,), "train_size": 4_000},
    tune_low_shot=True,
)
_PAPER = dict(epochs=90, batch_size=4096, optimizer="lars", lr=None, weight_decay=0.0, warmup_epochs=10, precision="bf16")
PRESETS: dict[str, dict[str, Any]] = {  # every field of the named settings
    "full": _FULL,
    "fast": dict(
        sizes={"train": 2_000, "val": 500, "test": 500},
        budget=dict(epochs=5, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=1, precision="fp32"),
        low_shot_budget=dict(
            epochs=40, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=4, precision="fp32"
        ),
        threshold_step=4,
        probes=("cls", "gap", "ep16", "mhca", "simpool", "cbam"),
        grid={"lrs": (1e-3, 1e-2), "weight_decays": (1e-4,)},
        tune_low_shot=False,
    ),
    "single-recipe": {**_FULL, "grid": None},
    "paper": {**_FULL, "budget": _PAPER, "low_shot_budget": _PAPER, "grid": None},
}


def _checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """A setting's fields (all but the name) checked and frozen."""
    sizes = values["sizes"]
    unknown, missing = sorted(set(sizes) - set(SPLITS)), [s for s in SPLITS if s not in sizes]
    if unknown or missing:
        raise ConfigError(
            f"sizes takes one size per split ({', '.join(SPLITS)}); "
            + (f"unknown: {', '.join(map(str, unknown))}" if unknown else f"missing: {', '.join(missing)}")
        )
    checked = {
        s: None if v is None else check_int(f"sizes[{s!r}] (images; None: the whole split)", v, 1) for s, v in sizes.items()
    }
    out = dict(values, sizes=_frozen(checked))
    for key in ("budget", "low_shot_budget"):
        unknown = sorted(set(values[key]) - set(BUDGET_KEYS))
        if unknown:
            raise ConfigError(f"unknown {key} option(s) {unknown}; a budget takes {', '.join(BUDGET_KEYS)}")
        out[key] = _frozen(values[key])
    out["threshold_step"] = check_int("threshold_step", values["threshold_step"], 1)
    out["grid"] = None if values["grid"] is None else _frozen(check_grid(values["grid"]))
    out["probes"] = None if values["probes"] is None else tuple(values["probes"])
    return out


@cache
def _preset(name: str) -> dict[str, Any]:
    return _checked(PRESETS[name])


def _truthful_name(name: str | None, values: Mapping[str, Any]) -> str:
    """`name`, refused when it names a preset whose recipe (or, for fast, small sizes) the values lack;
    None: the preset the values equal, else "custom"."""
    if name is None:
        return next((preset for preset in PRESETS if _preset(preset) == values), "custom")
    if name not in PRESETS:
        return name
    preset = _preset(name)
    fix = "leave the name out (a changed setting is named 'custom')"
    for key in ("budget", "low_shot_budget"):
        if values[key] != preset[key]:
            raise ConfigError(
                f"a setting named {name!r} runs the {name} {key} {dict(preset[key])}, got {dict(values[key])}: {fix}"
            )
    larger = {s: v for s, v in values["sizes"].items() if v is None or v > preset["sizes"][s]}
    if name == "fast" and larger:
        raise ConfigError(
            f"a setting named 'fast' checks the pipeline on at most {dict(preset['sizes'])} images, got {larger} "
            f"(None: the whole split): {fix}, or use Setting.full()"
        )
    return name


@dataclass(frozen=True)
class Setting:
    """Sizes, budgets, thresholds and probe set shared by every notebook.

    Attributes:
        name: "full", "fast", "single-recipe", "paper" (the presets) or "custom". Left out (None), the
            name of the preset the setting equals, else "custom"; a preset's name is refused on a setting
            without that preset's budgets, and "fast" on sizes larger than the fast ones.
        sizes: Images per split (train, val, test); None for a whole split of a dataset on disk.
        budget: :func:`epviz.fit` keyword arguments of a probe run (any of :data:`BUDGET_KEYS`).
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

    Raises:
        ConfigError: A split size that is not a whole number >= 1 (or None), an unknown split or budget
            option, a bad grid or threshold step, or a preset's name the setting contradicts.
    """

    name: str | None = None
    sizes: Mapping[str, int | None] = field(default_factory=lambda: _FULL["sizes"])
    budget: Mapping[str, Any] = field(default_factory=lambda: _FULL["budget"])
    low_shot_budget: Mapping[str, Any] = field(default_factory=lambda: _FULL["low_shot_budget"])
    threshold_step: int = 1
    probes: tuple[str, ...] | None = None
    grid: Mapping[str, Any] | None = field(default_factory=lambda: _FULL["grid"])
    tune_low_shot: bool = True

    def __post_init__(self) -> None:
        values = _checked({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"})
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "name", _truthful_name(self.name, values))

    @classmethod
    def full(cls) -> Setting:
        """The full standard setting (the numbers the README reports)."""
        return cls(name="full", **PRESETS["full"])

    @classmethod
    def fast(cls) -> Setting:
        """Small sizes and budgets for checking the pipeline (CI)."""
        return cls(name="fast", **PRESETS["fast"])

    @classmethod
    def single_recipe(cls) -> Setting:
        """The full sizes with one shared recipe for every probe (AdamW, lr 1e-3, weight decay 1e-4), no grid.

        One learning rate decides which probe wins (EP learns slowly at 1e-3); kept to reproduce
        earlier numbers, not for comparisons.
        """
        return cls(name="single-recipe", **PRESETS["single-recipe"])

    @classmethod
    def paper(cls) -> Setting:
        """The reference implementation's recipe on cached tokens: LARS, lr 0.1 x batch / 256, 90 epochs
        (10 of warm-up), batch 4096, no weight decay, bf16; no grid.

        The reference runs it with the backbone on augmented images at every step (``epviz.fit_images``);
        on cached tokens it is a different, cheaper protocol.
        """
        return cls(name="paper", **PRESETS["paper"])

    @property
    def is_fast(self) -> bool:
        """Whether this is the fast setting."""
        return self.name == "fast"

    def replace(self, **changes: Any) -> Setting:
        """A copy with some fields changed (``budget``, ``low_shot_budget``, ``sizes`` and ``grid`` entries are
        merged), named "custom" unless it still equals a preset or a `name` is given."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown setting field(s) {unknown}; the fields are {[f.name for f in dataclasses.fields(self)]}")
        for key in ("budget", "low_shot_budget", "sizes"):
            if key in changes:
                changes[key] = {**getattr(self, key), **changes[key]}
        if isinstance(changes.get("grid"), Mapping) and self.grid is not None:
            changes["grid"] = {**self.grid, **changes["grid"]}
        changes.setdefault("name", None)
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
