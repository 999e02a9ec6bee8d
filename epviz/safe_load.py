"""Reading weights and their JSON without trusting them: what a file declares is checked before anything is built.

epviz loads weights with ``torch.load(..., weights_only=True)`` (or safetensors) only. When a file
needs more than plain tensors, the error names the globals it would have to unpickle, found here
without running any of them.

Every loader (saved probes, reference heads, backbone weights) goes through the checks here before it
allocates what a file declares:

* :func:`check_archive`: a torch checkpoint's zip records may not declare more bytes than the file
  can hold uncompressed (torch writes them stored; a compressed record is a decompression bomb), and
  their checksums must match (torch does not check them);
* :func:`check_weights`: every tensor dense and contiguous as stored, its storage as large as its
  shape says (no stride-0 expansions), the total within a bound, every value finite, BatchNorm running
  variances non-negative;
* :func:`read_json`: a JSON file (``config.json``, a saved probe's model card) read only when it is at most
  :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` deep (:func:`check_nesting`, also for unpickled
  metadata), and is an object;
* :func:`config_int` and :func:`config_number`: a number of such a file parsed strictly (an integer is a
  JSON integer, not a string, a boolean or a float with a fraction) and within bounds.

Each failure is an :mod:`epviz.errors` error naming the file, the field and the fix;
:func:`torch_errors` turns what torch raises while building or placing the loaded weights
(``RuntimeError``, ``MemoryError``) into one.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from epviz.checks import check_int, check_number
from epviz.errors import ConfigError, EpvizError, WeightsError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_PARAMETERS",
    "MAX_SIZE",
    "check_archive",
    "check_nesting",
    "check_weights",
    "config_int",
    "config_number",
    "is_torch_checkpoint",
    "read_json",
    "strip_ansi",
    "torch_errors",
    "unsafe_globals",
]

MAX_JSON_BYTES = 10 * 2**20
"""The largest JSON file (config, model card) epviz reads: 10 MiB."""

MAX_JSON_DEPTH = 64
"""The deepest nesting of lists and objects a JSON file may have."""

MAX_SIZE = 10**5
"""The largest size a file may declare for one dimension of a probe: classes, token width, queries, heads."""

MAX_PARAMETERS = 300_000_000
"""The most values a probe or a head file may hold (about 1.2 GB in float32)."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes (torch and nbclient wrap parts of their messages in them)."""
    return _ANSI.sub("", text)


def is_torch_checkpoint(path: str | Path) -> bool:
    """Whether `path` starts like a file ``torch.save`` writes: a zip archive, or a pickle of the legacy format.

    A text file, an image or a safetensors file renamed ``.pth`` does not; their decoding errors are then
    reported as "not a torch checkpoint" rather than as pickled objects epviz refuses.
    """
    with open(path, "rb") as file:
        head = file.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def unsafe_globals(path: str | Path, err: BaseException) -> list[str]:
    """The globals a pickled checkpoint needs beyond plain tensors, sorted, read without unpickling anything.

    Args:
        path: The checkpoint.
        err: The error ``torch.load(..., weights_only=True)`` raised on it (its message is the fallback
            for containers torch's scanner cannot read).
    """
    found: list[str] = []
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        try:
            found = [str(g) for g in scan(str(path))]
        except Exception:  # noqa: BLE001 - an older container format: fall back on the message
            found = []
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", strip_ansi(str(err)))
    return sorted(dict.fromkeys(found))


# --- before reading: what the container declares ---------------------------------------------


def check_archive(path: str | Path, error: type[WeightsError] = WeightsError) -> None:
    """Refuse a damaged zip checkpoint, or one whose records declare more than the file holds, before ``torch.load`` reads it.

    ``torch.save`` stores its records uncompressed, so their declared sizes add up to about the file's
    size; compressed records (a few kB that inflate to gigabytes) are refused before anything is inflated.
    Then every record's CRC is checked (one read of the file, in 1 MiB chunks): torch itself does not, and
    a flipped byte in a tensor's record would load as a silently different weight. Files that are not
    zip archives (safetensors, the legacy pickle format) pass: their storages must be in the file.

    Raises:
        WeightsError: (or `error`) naming the file and the record that fails.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    declared, damaged, why = 0, None, ""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            if declared <= 2 * size + 2**20:
                damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as err:
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    if declared > 2 * size + 2**20:
        raise error(
            f"{path} declares {declared:,} bytes of records in a file of {size:,} bytes: torch.save stores its records "
            "uncompressed, and epviz does not inflate compressed ones (a small file that expands to gigabytes). "
            "Save the weights again with torch.save or safetensors"
        )
    if why or damaged is not None:
        what = why or f"the checksum of its record {damaged!r} does not match"
        raise error(f"cannot read {path}: a damaged zip archive ({what}); the file is damaged: download or export it again")


# --- after reading: the tensors themselves ------------------------------------------------


def check_weights(
    state: Mapping[str, Any],
    path: str | Path,
    error: type[WeightsError] = WeightsError,
    *,
    max_parameters: int | None = None,
) -> None:
    """Refuse tensors that are not what their shapes say, too many values, NaN or inf, or impossible BatchNorm statistics.

    Call it on what ``torch.load`` or safetensors returned, before anything reads the values: the
    first checks touch shapes and strides only, so a stride-0 expansion that pickles to a few bytes is
    refused before it is materialised.

    * every entry is a dense tensor, contiguous as stored, whose storage holds all of its values;
    * at most `max_parameters` values in all (when given);
    * no NaN or inf (they would turn every token and every prediction into NaN);
    * BatchNorm running variances (keys ending in ``running_var``) are not negative: the normalisation
      divides by their square root.

    Args:
        state: The state dict read from `path`.
        path: The file, for the message.
        error: The WeightsError subclass to raise.
        max_parameters: The most values the tensors may hold together (None: no bound).

    Raises:
        WeightsError: Names the first tensor that fails, why, and what to do.
    """
    fix = "the file is damaged or was not written by torch.save/safetensors of plain tensors: export it again"
    total = 0
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise error(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; {fix}")
        if value.layout != torch.strided or value.is_quantized:
            raise error(f"{path}: tensor {key!r} is stored as a {value.layout} tensor; epviz reads dense tensors only: {fix}")
        shape = tuple(value.shape)
        zero = [d for d, (n, s) in enumerate(zip(shape, value.stride())) if n > 1 and s == 0]
        if zero or not value.is_contiguous():
            how = f"an expansion (stride 0 along dimension {zero[0]})" if zero else "a strided view"
            raise error(
                f"{path}: tensor {key!r} of shape {shape} is {how} of {value.untyped_storage().nbytes():,} stored bytes, "
                f"not a dense tensor; reading it would materialise {value.numel() * value.element_size():,} bytes the file "
                f"does not hold. Save contiguous tensors ({{k: v.contiguous() for k, v in state.items()}}); {fix}"
            )
        needed = (value.storage_offset() + value.numel()) * value.element_size()
        if value.numel() and value.untyped_storage().nbytes() < needed:
            raise error(
                f"{path}: tensor {key!r} of shape {shape} needs {needed:,} bytes but its storage holds "
                f"{value.untyped_storage().nbytes():,}; {fix}"
            )
        total += value.numel()
    if max_parameters is not None and total > max_parameters:
        raise error(
            f"{path} holds {total:,} values, more than the {max_parameters:,} epviz reads from a file of this kind; "
            "it is not a probe head (or it is damaged)"
        )
    bad: list[tuple[str, int, int]] = []
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()) or not value.numel():
            continue
        count = int((~torch.isfinite(value)).sum())
        if count:
            bad.append((key, count, value.numel()))
    if bad:
        key, count, size = bad[0]
        all_bad = sum(c for _, c, _ in bad)
        more = f"; {len(bad)} tensors hold {all_bad} such values in all" if len(bad) > 1 else ""
        raise error(
            f"{path}: tensor {key!r} holds {count} NaN or inf values (of {size}){more}. Weights like these turn every "
            "token into NaN (storing tokens as float32 would not help); the file is damaged or comes from a diverged "
            "training run: download or export it again"
        )
    for key, value in state.items():
        if str(key).endswith("running_var") and value.numel() and not value.is_complex():
            negative = int((value < 0).sum())
            if negative:
                raise error(
                    f"{path}: tensor {key!r} is a BatchNorm running variance with {negative} negative values (of "
                    f"{value.numel()}, the smallest {float(value.min()):.4g}); the normalisation divides by its square "
                    "root, so every logit would be NaN. The file is damaged: export the head again"
                )


@contextmanager
def torch_errors(path: str | Path, doing: str, error: type[WeightsError] = WeightsError) -> Iterator[None]:
    """Turn what torch raises while building or placing loaded weights (RuntimeError, MemoryError) into `error`.

    Args:
        path: The file being loaded, for the message.
        doing: What was being done, e.g. "building the probe its JSON describes".
        error: The WeightsError subclass to raise.
    """
    try:
        yield
    except (RuntimeError, MemoryError, OverflowError) as err:
        first = (strip_ansi(str(err)).strip().splitlines() or [""])[0][:200]
        raise error(
            f"{path}: torch failed while {doing} ({type(err).__name__}: {first}); the file declares more than this "
            "machine can hold or is damaged: check it, or export it again"
        ) from None


# --- JSON ----------------------------------------------------------------------------------


def read_json(path: str | Path, *, what: str, fix: str, error: type[EpvizError] = ConfigError) -> dict[str, Any]:
    """The JSON object in `path`, read only when it is at most :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` deep.

    Args:
        path: The file.
        what: What it should hold, for the message (e.g. "a head's config.json").
        fix: The last sentence of the message: what to do.
        error: The error to raise (ConfigError for a configuration, WeightsError for a saved probe's JSON).

    Raises:
        FileNotFoundError: There is no such file.
        ConfigError: (or `error`) The file is too large, not UTF-8, not JSON, nested too deeply, or not an object.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; it should hold {what}") from None
    except OSError as err:
        raise error(f"{path} is not readable JSON ({err}); it should hold {what}. {fix}") from None
    if size > MAX_JSON_BYTES:
        raise error(
            f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES // 2**20} MiB epviz reads as {what}: it is not one. {fix}"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # deeper than the JSON decoder's recursion limit
        raise error(f"{path} nests lists and objects more than {MAX_JSON_DEPTH} deep, which {what} never does. {fix}") from None
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        first = (str(err).splitlines() or [""])[0][:200]
        raise error(f"{path} is not readable JSON ({first}); it should hold {what}. {fix}") from None
    check_nesting(doc, str(path), what, fix, error=error)
    if not isinstance(doc, dict):
        raise error(f"{path} holds a JSON {type(doc).__name__}, not the object of {what}. {fix}")
    return doc


def check_nesting(value: object, where: str, what: str, fix: str, *, error: type[EpvizError] = ConfigError) -> None:
    """Refuse metadata (parsed JSON, or the plain containers of an unpickled checkpoint) nested beyond :data:`MAX_JSON_DEPTH`.

    The walk is iterative, so a value nested thousands deep is refused instead of ending in a RecursionError
    in whatever walks it next (JSON encoding, provenance records).

    Raises:
        ConfigError: (or `error`) naming `where`.
    """
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, Mapping):
            items: Any = item.values()
        elif isinstance(item, (list, tuple)):
            items = item
        else:
            continue
        if level > MAX_JSON_DEPTH:
            raise error(f"{where} nests lists and objects more than {MAX_JSON_DEPTH} deep, which {what} never does. {fix}")
        todo.extend((child, level + 1) for child in items)


def config_int(
    value: object,
    where: str,
    field: str,
    fix: str,
    *,
    low: int = 1,
    high: int = MAX_SIZE,
    error: type[ConfigError] | type[WeightsError] = ConfigError,
) -> int:
    """`value` read from a file as an int in ``[low, high]``: a JSON integer (or a float without fraction).

    A string ("10"), a boolean (true) or 10.5 is refused rather than converted, so that a file cannot
    state a number its checks would not see. Raises `error` naming `where`, `field`, the value and the
    range, followed by `fix`.
    """
    return _from_file(check_int, value, where, field, fix, error, low=low, high=high)


def config_number(
    value: object,
    where: str,
    field: str,
    fix: str,
    *,
    low: float | None = None,
    high: float | None = None,
    error: type[ConfigError] | type[WeightsError] = ConfigError,
) -> float:
    """`value` read from a file as a finite float in ``[low, high]`` (not a string or a boolean); see :func:`config_int`."""
    return _from_file(check_number, value, where, field, fix, error, low=low, high=high)


def _from_file(check: Any, value: object, where: str, field: str, fix: str, error: type[EpvizError], **bounds: Any) -> Any:
    """The shared argument check `check` applied to a value a file states, its error naming the file."""
    try:
        return check(f"{where}: {field}", value, **bounds)
    except ConfigError as err:
        raise error(f"{err}. {fix}") from None
