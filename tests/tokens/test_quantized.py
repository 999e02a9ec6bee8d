"""Int8 tokens with a per-token scale: the error bound, the scale dtype, Int8Tokens in a TokenSet."""

import numpy as np
import pytest
import torch

from epviz.errors import DataError
from epviz.tokens import Int8Tokens, TokenSet, dequantize, quantize

SLACK = 2.0**-16  # float32 rounding of x / s and q * s, as a fraction of s


def check_bound(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` and check every documented property of the result."""
    values, scales = quantize(x)
    x = x.float()
    assert values.dtype == torch.int8 and values.shape == x.shape
    assert scales.shape == x.shape[:-1] and scales.dtype in (torch.float16, torch.float32)
    s = scales.float()
    assert bool(torch.isfinite(s).all()) and bool((s >= 0).all())
    amax = x.abs().amax(-1)
    assert bool((s.double() >= amax.double() / 127 * (1 - 2**-24)).all()), "the scale is never rounded down"
    err = (dequantize(values, scales) - x).abs()
    assert bool((err <= s.unsqueeze(-1) * (0.5 + SLACK)).all())
    normal = s >= (2.0**-14 if scales.dtype == torch.float16 else 2.0**-126)
    peak_bound = amax / 254 * (1 + 2**-10) * (1 + 2**-15)
    assert bool((err.amax(-1) <= peak_bound)[normal].all())
    q = values.int().abs().amax(-1)
    assert bool((q <= 127).all()) and bool((q[(amax > 0) & normal] == 127).all()), "each token's peak maps to +-127"
    assert bool((values[amax == 0] == 0).all()) and bool((s[amax == 0] == 0).all())
    return values, scales


@pytest.mark.parametrize("std", [1e-2, 1.0, 30.0, 1e4])
def test_round_trip_bound_on_random_tokens(std):
    x = torch.randn(64, 49, 96, generator=torch.Generator().manual_seed(0)) * std
    _, scales = check_bound(x)
    assert scales.dtype == torch.float16


def test_round_trip_bound_on_adversarial_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 8, 32, generator=g)
    x[0, 0, 5] = 1e4  # an outlier dominates its token's scale
    x[1] = 0.0  # all-zero tokens
    x[2, 3] = 0.0
    x[3, 0] = torch.arange(32) - 15.5  # half-way values
    x[4, 1] = -7.0  # a constant negative token
    x[5, 2] = torch.linspace(-1, 1, 32) * 65504 * 127  # the largest float16 scale exactly
    x[6, 2, 0] = 2.0**-14 * 127  # the smallest normal float16 scale exactly
    values, scales = check_bound(x)
    assert scales.dtype == torch.float16
    assert not bool(torch.isnan(dequantize(values, scales)).any())
    assert bool((dequantize(values, scales)[1] == 0).all())


@pytest.mark.parametrize("peak", [65504.0 * 127 * 1.01, 3e30, 1e-3, 1e-20, 1e-40, 1.4e-45])
def test_scales_outside_the_normal_float16_range_are_stored_as_float32(peak):
    x = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))
    x = x / x.abs().amax(-1, keepdim=True) * peak
    x[0, 0] = 0.0
    _, scales = check_bound(x)
    assert scales.dtype == torch.float32
    assert bool((scales[x.abs().amax(-1) > 0] > 0).all()), "no scale underflows to 0"
    with pytest.raises(DataError, match="outside the normal float16 range.*scale_dtype=torch.float32"):
        quantize(x, scale_dtype=torch.float16)


def test_forced_scale_dtype_and_input_dtypes():
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(3))
    assert quantize(x, scale_dtype=torch.float32)[1].dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        check_bound(x.to(dtype))


def test_nonfinite_tokens_are_refused():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = float("nan")
    with pytest.raises(DataError, match="1 NaN or inf"):
        quantize(x)


def test_numpy_and_torch_dequantize_agree_bit_for_bit():
    x = torch.randn(10, 6, 24, generator=torch.Generator().manual_seed(4)) * 5
    values, scales = quantize(x)
    tokens = Int8Tokens(values.numpy(), scales.numpy())
    assert np.array_equal(np.asarray(tokens), dequantize(values, scales).numpy())


def make_tokens(n=20, tokens=4, dim=8, seed=0):
    x = torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(seed)) * 3
    return Int8Tokens.from_floats(x)


def test_int8_tokens_behave_like_the_float_array():
    tokens = make_tokens()
    dense = np.asarray(tokens)
    assert dense.dtype == np.float32 and dense.shape == (20, 4, 8)
    assert tokens.shape == (20, 4, 8) and tokens.ndim == 3 and len(tokens) == 20 and tokens.dtype == np.float32
    assert tokens.nbytes == 20 * 4 * 8 + 20 * 4 * 2
    assert tokens.flags.writeable
    for index in (3, -1, slice(2, 9, 3), [5, 1, 5], np.array([0, 19]), np.arange(20) % 3 == 0):
        out = tokens[index]
        assert out.dtype == np.float32 and np.array_equal(out, dense[index])
    with pytest.raises(TypeError, match="first axis only"):
        tokens[0, 1]
    assert np.asarray(tokens, dtype=np.float64).dtype == np.float64


def test_tokenset_over_int8_matches_the_dequantized_floats():
    patch, prefix = make_tokens(seed=0), make_tokens(tokens=1, seed=1)
    labels = np.arange(20) % 4
    q = TokenSet(patch, prefix, labels, (2, 2))
    f = TokenSet(np.asarray(patch), np.asarray(prefix), labels, (2, 2))
    for index in (np.array([7, 3, 3, 19, 0]), np.arange(20)[::-1]):
        a, b = q.batch(index), f.batch(index)
        assert a.patch.dtype == torch.float32 and torch.equal(a.patch, b.patch) and torch.equal(a.prefix, b.prefix)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
    gq, gf = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for a, b in zip(q.batches(6, shuffle=True, generator=gq), f.batches(6, shuffle=True, generator=gf), strict=True):
        assert torch.equal(a.patch, b.patch) and torch.equal(a.index, b.index)
    assert q.find_nonfinite() is None and (q.dim, q.num_tokens, q.num_prefix) == (8, 4, 1)


def test_load_and_subset_stay_int8():
    ts = TokenSet(make_tokens(), make_tokens(tokens=1, seed=1), np.arange(20) % 4, (2, 2))
    loaded = ts.load()
    assert isinstance(loaded.patch, Int8Tokens) and isinstance(loaded.prefix, Int8Tokens)
    assert loaded.patch.values.dtype == np.int8 and loaded.patch.nbytes == ts.patch.nbytes
    assert not np.shares_memory(loaded.patch.values, ts.patch.values)
    sub = ts.subset([11, 2, 5])
    assert isinstance(sub.patch, Int8Tokens) and isinstance(sub.prefix, Int8Tokens)
    assert sub.patch.nbytes == 3 * (4 * 8 + 4 * 2) and len(sub) == 3
    assert np.array_equal(np.asarray(sub.patch), np.asarray(ts.patch)[[2, 5, 11]])
    assert torch.equal(sub.batch(np.arange(3)).patch, ts.batch(np.array([2, 5, 11])).patch)


def test_memory_mapped_int8_tokens_are_read_only(tmp_path):
    tokens = make_tokens()
    np.save(tmp_path / "v.npy", tokens.values)
    np.save(tmp_path / "s.npy", tokens.scales)
    mapped = Int8Tokens(np.load(tmp_path / "v.npy", mmap_mode="r"), np.load(tmp_path / "s.npy", mmap_mode="r"))
    assert not mapped.flags.writeable
    assert np.array_equal(np.asarray(mapped), np.asarray(tokens))
    ts = TokenSet(mapped, None, np.arange(20) % 4, (2, 2))
    assert torch.equal(ts.batch(np.array([4, 1])).patch, torch.from_numpy(np.asarray(tokens)[[4, 1]]))
    assert ts.find_nonfinite(chunk_bytes=64) is None and ts._finite is None, "read-only: the scan is remembered"
    loaded = ts.load()
    assert isinstance(loaded.patch, Int8Tokens) and type(loaded.patch.values) is np.ndarray
    assert loaded.patch.flags.writeable


@pytest.mark.parametrize("bad", [np.inf, np.nan, -0.5])
def test_a_negative_or_nonfinite_scale_is_refused_wherever_tokens_are_read(tmp_path, bad):
    tokens = make_tokens()
    tokens.scales[13, 2] = bad
    ts = TokenSet(tokens, None, np.arange(20) % 4, (2, 2))
    for read in (lambda: ts.find_nonfinite(chunk_bytes=100), lambda: ts.batch(np.array([2, 13])), lambda: tokens[13]):
        with pytest.raises(DataError, match=f"int8 token scales hold {bad} .*finite and never negative"):
            read()
    with pytest.raises(DataError, match="finite and never negative"):
        dequantize(torch.from_numpy(tokens.values), torch.from_numpy(tokens.scales))
    assert np.array_equal(tokens[:13], make_tokens()[:13]), "the good rows still read"
    np.save(tmp_path / "v.npy", tokens.values)
    np.save(tmp_path / "s.npy", tokens.scales)
    mapped = Int8Tokens(np.load(tmp_path / "v.npy", mmap_mode="r"), np.load(tmp_path / "s.npy", mmap_mode="r"))
    with pytest.raises(DataError, match=f"the file {tmp_path / 's.npy'} is damaged: delete {tmp_path} and extract again"):
        mapped[10:15]


def test_bad_shapes_and_dtypes_are_named():
    values = np.zeros((4, 3, 8), np.int8)
    with pytest.raises(DataError, match=r"values of shape \(4, 3, 8\) need one scale per token, shape \(4, 3\)"):
        Int8Tokens(values, np.zeros((4, 2), np.float16))
    with pytest.raises(DataError, match="need one scale per token"):
        dequantize(torch.zeros(4, 3, 8, dtype=torch.int8), torch.zeros(3, 4))
    with pytest.raises(DataError, match="must be an int8 array"):
        Int8Tokens(values.astype(np.float16), np.zeros((4, 3), np.float16))
    with pytest.raises(DataError, match="must be an int8 array"):
        Int8Tokens(values[0], np.zeros(3, np.float16))
    with pytest.raises(DataError, match="float16 or float32"):
        Int8Tokens(values, np.zeros((4, 3), np.int32))
