"""Int8 tokens with one scale per token: a quarter of fp32 storage, half of fp16.

:func:`quantize` maps each token (the last axis, D values) to int8 with a symmetric scale
``s = max|x| / 127`` rounded *up* to the scale's storage dtype, and :func:`dequantize`
maps back: ``x ≈ q * s``. :class:`Int8Tokens` wraps the two arrays (usually read-only memory
maps) so that a :class:`~epviz.tokens.TokenSet` can hold them where it holds float arrays.

Error bound (per element, for finite x taken as float32)::

    |dequantize(q, s) - x| <= s / 2 + s * 2**-16

where ``s`` is the token's *stored* scale read as float32. The ``s / 2`` is the int8
rounding; the ``s * 2**-16`` covers the float32 rounding of ``x / s`` and of ``q * s``
(at most ``255 * 2**-24 * s``). Rounding the scale up means no value is ever clamped.
The rounding of the scale to its dtype moves ``s`` above ``max|x| / 127`` by at most a
relative ``2**-10`` for float16 scales (they are always normal numbers, see below) and
``2**-23`` for normal float32 scales, so for those the bound is also
``|error| <= max|x| / 254 * (1 + 2**-10) * (1 + 2**-15)``. A token that is all zeros has
scale 0 and values 0, and comes back as exact zeros.

A scale is finite and never negative; a negative, NaN or inf scale (a damaged file or array) is
refused wherever tokens are dequantized (:func:`dequantize`, :class:`Int8Tokens` indexing,
TokenSet batches), with a DataError naming the scale and, for a memory map, its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epviz.errors import ConfigError, DataError

__all__ = ["Int8Tokens", "check_scales", "dequantize", "quantize"]

_FP16_MAX = 65504.0  # largest finite float16
_FP16_TINY = 2.0**-14  # smallest normal float16: below it a scale loses relative precision


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` (float64) cast to `dtype`, moved one step up wherever the cast rounded it down."""
    cast = scale.to(dtype)
    low = cast.double() < scale
    return torch.where(low, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)


def _scale_dtype(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    """float16 when every non-zero scale is a normal float16 number, else float32 (or check a forced choice)."""
    nonzero = scale[scale > 0]
    fits = not nonzero.numel() or (float(nonzero.min()) >= _FP16_TINY and float(nonzero.max()) <= _FP16_MAX)
    if scale_dtype is None:
        return torch.float16 if fits else torch.float32
    if scale_dtype not in (torch.float16, torch.float32):
        raise ConfigError(f"scale_dtype must be torch.float16, torch.float32 or None (choose), got {scale_dtype!r}")
    if scale_dtype == torch.float16 and not fits:
        raise DataError(
            f"the token scales (max|x| / 127) range from {float(nonzero.min()):.3g} to {float(nonzero.max()):.3g}, "
            f"outside the normal float16 range [{_FP16_TINY:.3g}, {_FP16_MAX:g}]; quantize with scale_dtype=torch.float32"
        )
    return scale_dtype


def quantize(x: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per token (the last axis).

    The scale of a token is ``max|x| / 127`` over its D values, rounded up to the scale
    dtype; the values are ``round(x / scale)`` (half to even), which then lie in
    [-127, 127]. See the module docstring for the error bound.

    Args:
        x: Float tokens (..., D); computed in float32.
        scale_dtype: None (default) stores float16 scales when every non-zero scale is a
            normal float16 number (2**-14 <= scale <= 65504, i.e. 0.0078 <= max|x| <= 8.3e6)
            and float32 scales otherwise, so a scale never overflows, underflows or loses
            relative precision. Pass a dtype to fix it (e.g. when writing batches into one file).

    Returns:
        Values int8 (..., D) and scales (...,) float16 or float32.

    Raises:
        DataError: `x` holds NaN or inf (int8 cannot hold them), or float16 scales were asked
            for but do not fit.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ConfigError(f"quantize needs a float tensor (..., D); got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise DataError(f"quantize needs tokens of at least one value on the last axis; got shape {tuple(x.shape)}")
    x = x.float()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise DataError(
            f"the tokens hold {bad} NaN or inf values (float32 view) and int8 cannot hold them; find the bad samples "
            "with TokenSet.find_nonfinite and fix the backbone or the images before quantizing"
        )
    amax = x.abs().amax(dim=-1)
    exact = amax.double() / 127.0
    dtype = _scale_dtype(exact, scale_dtype)
    scales = _round_up(exact, dtype)
    s = scales.float().unsqueeze(-1)
    ratio = x / torch.where(s > 0, s, torch.ones_like(s))  # a zero scale means an all-zero token: 0 / 1
    values = torch.round(ratio).clamp_(-127, 127).to(torch.int8)
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 tokens ``values * scales`` from :func:`quantize`'s output.

    Args:
        values: Int8 values (..., D).
        scales: Scales (...,), float16 or float32.

    Raises:
        DataError: The shapes do not fit: scales must be values' shape without its last axis; or a
            scale is negative, NaN or inf.
    """
    if tuple(values.shape[:-1]) != tuple(scales.shape):
        raise DataError(_shape_message(tuple(values.shape), tuple(scales.shape)))
    if not bool(((scales >= 0) & torch.isfinite(scales)).all()):
        check_scales(scales.detach().float().cpu().numpy())  # names the first bad scale
    return values.float() * scales.float().unsqueeze(-1)


def check_scales(scales: np.ndarray, source: Any = None) -> None:
    """Refuse int8 token scales that are negative, NaN or inf (:func:`quantize` never writes them).

    Args:
        scales: The scales about to be used (any shape).
        source: The array they were read from: a memory map's file is named in the message.

    Raises:
        DataError: Names the first bad scale's value, and the file or the fix.
    """
    scales = np.asarray(scales)
    good = (scales >= 0) & (scales < np.inf)  # NaN fails both
    if bool(good.all()):
        return
    value = float(scales.reshape(-1)[np.flatnonzero(~good.reshape(-1))[0]])
    filename = getattr(source, "filename", None)
    fix = (
        f"the file {filename} is damaged: delete {Path(filename).parent} and extract again"
        if filename
        else "quantize the float tokens again (Int8Tokens.from_floats)"
    )
    raise DataError(
        f"int8 token scales hold {value} ({int((~good).sum())} of the {good.size} scales read are negative, NaN or inf): "
        f"a scale is max|x| / 127, finite and never negative; {fix}"
    )


def _dequantize_numpy(values: np.ndarray, scales: np.ndarray, source: Any = None) -> np.ndarray:
    """The numpy twin of :func:`dequantize` (bit-identical: one float32 product per element); refuses bad
    scales (:func:`check_scales`, naming `source`'s file)."""
    check_scales(scales, source)
    out = values.astype(np.float32)
    out *= np.asarray(scales, dtype=np.float32)[..., None]  # in place: one float32 array, not two
    return out


def _shape_message(values: tuple[int, ...], scales: tuple[int, ...]) -> str:
    return (
        f"int8 token values of shape {values} need one scale per token, shape {values[:-1]}; got scales of shape "
        f"{scales}: pass the values and scales that quantize() returned together"
    )


@dataclass(frozen=True)
class _Flags:
    """The one array flag TokenSet reads."""

    writeable: bool


class Int8Tokens:
    """Int8 tokens (n, N, D) with float scales (n, N), read as float32 like a numpy array.

    Indexing the first axis (an int, a slice, an integer or boolean array) returns the
    dequantized float32 rows; ``np.asarray`` dequantizes everything. ``shape`` and ``dtype``
    describe what indexing yields, ``nbytes`` what is stored.

    Attributes:
        values: Int8 array (n, N, D), usually a read-only memory map.
        scales: Float16 or float32 array (n, N).
    """

    def __init__(self, values: np.ndarray, scales: np.ndarray) -> None:
        """Wrap `values` and `scales` (not copied).

        Raises:
            DataError: `values` is not 3-D int8, or `scales` is not float16/float32 of shape values.shape[:2].
        """
        if getattr(values, "ndim", None) != 3 or getattr(values, "dtype", None) != np.int8:
            raise DataError(
                f"int8 token values must be an int8 array (images, tokens, dim); got "
                f"{getattr(values, 'dtype', type(values).__name__)} of shape {getattr(values, 'shape', None)}"
            )
        if getattr(scales, "dtype", None) not in (np.float16, np.float32):
            raise DataError(
                f"token scales must be a float16 or float32 array; got {getattr(scales, 'dtype', type(scales).__name__)}"
            )
        if tuple(scales.shape) != tuple(values.shape[:2]):
            raise DataError(_shape_message(tuple(values.shape), tuple(scales.shape)))
        self.values = values
        self.scales = scales

    @classmethod
    def from_floats(cls, x: np.ndarray | torch.Tensor, scale_dtype: torch.dtype | None = None) -> Int8Tokens:
        """Quantize float tokens (n, N, D) into an in-memory Int8Tokens (see :func:`quantize`)."""
        values, scales = quantize(x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x)), scale_dtype)
        return cls(values.numpy(), scales.numpy())

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n, N, D), as for the float array it stands for."""
        n, tokens, dim = self.values.shape
        return int(n), int(tokens), int(dim)

    @property
    def ndim(self) -> int:
        """Always 3."""
        return 3

    @property
    def dtype(self) -> np.dtype:
        """float32: the dtype that indexing yields (the storage is int8 + scales)."""
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the int8 values plus the scales."""
        return int(self.values.nbytes) + int(self.scales.nbytes)

    @property
    def flags(self) -> _Flags:
        """``writeable`` is False only when both arrays are read-only (then the tokens cannot change)."""
        return _Flags(writeable=bool(self.values.flags.writeable or self.scales.flags.writeable))

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, index: Any) -> np.ndarray:
        """Dequantized float32 rows; `index` selects along the first axis only."""
        if isinstance(index, tuple) or index is Ellipsis or index is None:
            raise TypeError(
                f"Int8Tokens indexes the first axis only (an int, a slice or an index array), got {index!r}; "
                "select rows first, then index the float32 result: tokens[rows][..., d]"
            )
        return _dequantize_numpy(np.asarray(self.values[index]), np.asarray(self.scales[index]), self.scales)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("Int8Tokens cannot be viewed as a float array without a copy: it is dequantized")
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def load(self) -> Int8Tokens:
        """An Int8Tokens over in-RAM copies of the two arrays (still int8)."""
        return Int8Tokens(np.array(self.values, order="C", copy=True), np.array(self.scales, order="C", copy=True))

    def take(self, index: np.ndarray | list[int]) -> Int8Tokens:
        """An in-RAM Int8Tokens of the rows at `index` (still int8)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return Int8Tokens(np.array(self.values[index], copy=True), np.array(self.scales[index], copy=True))

    def __repr__(self) -> str:
        n, tokens, dim = self.shape
        return f"Int8Tokens(n={n}, tokens={tokens}, dim={dim}, scales={self.scales.dtype}, {self.nbytes} bytes)"
