"""The argument checks shared by epviz's public functions.

Each returns the value converted or raises :class:`~epviz.errors.ConfigError` naming the argument,
the value and the valid range, e.g. ``check_sequence("lrs", lrs, positive, unique=True)``. Bools are
never numbers here (``lrs=(True,)`` would train at lr 1.0), nor is 2.5 an integer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import numpy as np

from epviz.errors import ConfigError

__all__ = ["check_array", "check_int", "check_number", "check_sequence", "non_negative", "positive"]

T = TypeVar("T")


def _range(low, high, open_low: bool = False, open_high: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    return "" if high is None else f"{'<' if open_high else '<='} {high:g}"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (bounds optional); a whole float such as 3.0 counts, a bool or 2.5 does not."""
    if not (_is_real(value) and float(value).is_integer()) or not (
        (low is None or value >= low) and (high is None or value <= high)
    ):
        raise ConfigError(f"{name} must be an integer {_range(low, high)}".rstrip() + f", got {value!r}")
    return int(value)


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> float:
    """`value` as a finite float between `low` and `high` (closed bounds unless `open_low` / `open_high`); never a bool."""
    ok = _is_real(value) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        raise ConfigError(
            f"{name} must be a finite number {_range(low, high, open_low, open_high)}".rstrip() + f", got {value!r}"
        )
    return float(value)


positive = partial(check_number, low=0, open_low=True)  # a finite number > 0
non_negative = partial(check_number, low=0)  # a finite number >= 0


def check_sequence(
    name: str,
    values: Any,
    check: Callable[[str, Any], T],
    *,
    length: int | None = None,
    unique: bool = False,
    increasing: bool = False,
    example: str | None = None,
) -> tuple[T, ...]:
    """`values` (any iterable but a string or a single number) as a tuple of ``check(f"{name}[i]", element)``:
    exactly `length` elements (None: at least one), optionally each once or strictly increasing;
    `example` (``"(1e-3, 1e-2)"``) is shown in the messages."""
    hint = f", e.g. {name}={example}" if example else ""
    if _is_real(values):
        one = f": pass {name}=({values!r},) for one value" if length is None else ""
        raise ConfigError(f"{name} must be a sequence, not the single number {values!r}{one}{hint}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{name} must be a sequence{hint}; got {values!r}")
    items = tuple(values)
    if (length is None and not items) or (length is not None and len(items) != length):
        wanted = "at least one value" if length is None else f"exactly {length} values"
        raise ConfigError(f"{name} must hold {wanted}{hint}; got {len(items)}: {values!r}")
    out = tuple(check(f"{name}[{i}]", v) for i, v in enumerate(items))
    if unique and len(set(out)) != len(out):
        raise ConfigError(f"{name}={list(out)} repeats a value: list each value once (they must be distinct)")
    if increasing and any(not a < b for a, b in zip(out, out[1:])):  # type: ignore[operator]
        raise ConfigError(f"{name}={list(out)} must strictly increase")
    return out


def check_array(name: str, value: Any) -> np.ndarray:
    """`value` (array-like or tensor) as a float64 array; strings, complex numbers and ragged lists are refused."""
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device), without importing torch here
        value = value.detach().cpu()
        if value.is_complex():
            raise ConfigError(f"{name} must be real numbers, got a tensor of dtype {value.dtype}")
        value = value.double().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged nesting
        raise ConfigError(f"{name} must be a rectangular array of numbers ({err})") from None
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"{name} must be an array of real numbers, got dtype {array.dtype}: {value!r:.200}")
    return array.astype(np.float64, copy=False)
