"""One pass over the tokens that feeds many meters (:mod:`epviz.analysis.meters`).

Per batch the tokens are moved to the device once and the attention maps are computed once
(when a meter needs them); each meter then gets the part of the batch in its subset of images
(``index`` or ``localization_index``). An image in both subsets is read once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from epviz.analysis._common import context_columns, prepare_probe, require_predictors
from epviz.analysis.meters import Meter, MeterBatch, meter_class, meter_names
from epviz.checks import check_int
from epviz.evaluate import check_labels, eval_mode
from epviz.probes import Probe
from epviz.runtime import autocast
from epviz.tokens import TokenBatch, TokenSet

__all__ = ["build_meters", "measure"]


def measure(
    probe: Probe,
    tokens: TokenSet,
    dataset: Any = None,
    meters: Sequence[str | Meter] | None = None,
    *,
    index: Iterable[int] | None = None,
    localization_index: Iterable[int] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    context: Mapping | None = None,
    options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Run every meter over `tokens` in one pass and join their summaries, one row per predictor.

    Args:
        probe: A trained attentive probe.
        tokens: The tokens measured (the images of `dataset`, in its order).
        dataset: The images' dataset with GT boxes, for meters that need them.
        meters: Meter names or instances (instances keep their state after the pass, e.g. for
            :meth:`~epviz.analysis.Localization.curves`); default: every registered meter.
        index: Images of the ``"index"`` meters (default: all, in stored order).
        localization_index: Images of the ``"localization_index"`` meters (default: `index`).
        batch_size: Images per batch.
        device: Where to run the probe; None picks automatically.
        precision: "fp32" or "bf16".
        context: Values of the context columns (defaults: probe name, ``tokens.origin``).
        options: Options of the meters given by name: each is built with those its constructor
            accepts (e.g. ``{"thresholds": ..., "records": True, "train_tokens": ..., "seed": 3}``).

    Returns:
        The context columns, ``predictor``, then each meter's columns in the given order. When
        several meters report ``n_images``, the first one's is kept; a later meter on the same
        subset drops its own, one on the other subset reports ``n_images_<meter name>``.

    Raises:
        ValueError: No meter, an unknown precision, positions outside the tokens, or two
            meters reporting the same column.
    """
    require_predictors(probe, "measure")
    check_labels(tokens.labels, probe.num_classes, "the", f"probe '{probe.name}'")
    chosen = build_meters(meters, options or {})
    device = prepare_probe(probe, device)
    autocast(device, precision)  # rejects an unknown precision before any work
    batch_size = check_int("batch_size", batch_size, 1)
    positions, members = _plan(len(tokens), index, localization_index)
    for meter in chosen:
        meter.start(probe, tokens, dataset)
    with eval_mode(probe):
        for rows in _batches(len(positions), batch_size):
            _feed(
                chosen,
                probe,
                tokens.batch(positions[rows], device=device),
                {s: m[rows] for s, m in members.items()},
                dataset,
                device,
                precision,
            )
    return _join(chosen, context_columns(context, probe, tokens))


def _built(name: str, options: Mapping[str, Any]) -> Meter:
    """The registered meter `name`, built with the `options` its constructor accepts."""
    cls = meter_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted})


def build_meters(meters: Sequence[str | Meter] | None, options: Mapping[str, Any]) -> list[Meter]:
    """Meter instances: instances as given, names built with the `options` their constructors accept (None: every registered meter)."""
    names = meter_names() if meters is None else meters
    if isinstance(names, (str, Meter)):
        names = [names]
    chosen = [m if isinstance(m, Meter) else _built(m, options) for m in names]
    if not chosen:
        raise ValueError(f"measure got no meters; pass meter names (registered: {meter_names()}) or Meter instances")
    return chosen


def _positions(n: int, index: Iterable[int] | None) -> np.ndarray:
    if n == 0:
        raise ValueError("the token set is empty: there is nothing to measure")
    if index is None:
        return np.arange(n)
    out = np.asarray(index if isinstance(index, np.ndarray) else list(index), dtype=np.int64).reshape(-1)
    if len(out) and (out.min() < 0 or out.max() >= n):
        raise ValueError(f"index must lie in [0, {n}); got values from {out.min()} to {out.max()}")
    return out


def _plan(n: int, index, localization_index) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The positions read, in order, and per subset which of them belong to it.

    The ``index`` positions come first in their order; a ``localization_index`` position reuses
    an ``index`` entry of the same image when one is free, else it is appended.
    """
    main = _positions(n, index)
    if localization_index is None:
        both = np.ones(len(main), dtype=bool)
        return main, {"index": both, "localization_index": both}
    loc = _positions(n, localization_index)
    free: dict[int, list[int]] = {}
    for row, p in enumerate(main.tolist()):
        free.setdefault(p, []).append(row)
    for rows in free.values():
        rows.reverse()  # pop() hands them out in order
    in_loc = np.zeros(len(main), dtype=bool)
    extra = []
    for p in loc.tolist():
        waiting = free.get(p)
        if waiting:
            in_loc[waiting.pop()] = True
        else:
            extra.append(p)
    positions = np.concatenate([main, np.asarray(extra, dtype=np.int64)])
    in_main = np.concatenate([np.ones(len(main), bool), np.zeros(len(extra), bool)])
    return positions, {"index": in_main, "localization_index": np.concatenate([in_loc, np.ones(len(extra), bool)])}


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _select(tokens: TokenBatch, keep: np.ndarray) -> TokenBatch:
    rows = torch.from_numpy(np.flatnonzero(keep))
    on = rows.to(tokens.patch.device)
    return TokenBatch(
        patch=tokens.patch[on],
        prefix=None if tokens.prefix is None else tokens.prefix[on],
        labels=tokens.labels[on],
        index=tokens.index[rows],
    )


def _feed(
    meters: list[Meter],
    probe: Probe,
    tokens: TokenBatch,
    members: dict[str, np.ndarray],
    dataset,
    device: torch.device,
    precision: str,
) -> None:
    if any(m.needs_maps and members[m.subset].any() for m in meters):
        with autocast(device, precision):
            maps = probe.attention(tokens.patch, tokens.prefix).float().cpu()
    else:
        maps = None
    for meter in meters:
        keep = members[meter.subset]
        if not keep.any():
            continue
        part, part_maps = tokens, maps
        if not keep.all():
            part = _select(tokens, keep)
            part_maps = None if maps is None else maps[torch.from_numpy(np.flatnonzero(keep))]
        meter.update(part_maps, MeterBatch(probe, part, dataset, device, precision))


def _name(meter: Meter) -> str:
    return meter.name or type(meter).__name__


def _join(meters: list[Meter], context: dict) -> pd.DataFrame:
    table: pd.DataFrame | None = None
    owner: dict[str, Meter] = {}
    for meter in meters:
        part = meter.summary()
        if "predictor" not in part.columns:
            raise ValueError(
                f"meter '{_name(meter)}' returned a summary without a `predictor` column: "
                "Meter.summary() must give one row per predictor"
            )
        if "n_images" in part.columns and "n_images" in owner:
            if meter.subset == owner["n_images"].subset:
                part = part.drop(columns="n_images")
            else:
                part = part.rename(columns={"n_images": f"n_images_{meter.name}"})
        clash = [c for c in part.columns if c != "predictor" and c in owner]
        if clash:
            raise ValueError(
                f"meters '{_name(owner[clash[0]])}' and '{_name(meter)}' both report the columns {clash}; "
                "rename the columns of one of them"
            )
        owner.update({c: meter for c in part.columns if c != "predictor"})
        table = part if table is None else table.merge(part, on="predictor")
    assert table is not None  # _meters refuses an empty list of meters
    for i, (key, value) in enumerate(context.items()):
        table.insert(i, key, [value] * len(table))
    return table
