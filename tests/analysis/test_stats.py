"""The shared Spearman: known values, scipy agreement, NaN where undefined, the row-wise form."""

import math

import numpy as np
import pytest
from scipy import stats

from epviz.analysis import row_spearman, spearman


def test_known_values_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]).rho == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]).rho == pytest.approx(-1.0)
    rho, p = spearman([1, 2, 2, 3, 5], [2, 1, 4, 4, 9])  # ties get their average rank
    ref = stats.spearmanr([1, 2, 2, 3, 5], [2, 1, 4, 4, 9])
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert 0 < rho < 1 and 0 < p < 1


@pytest.mark.parametrize("x, y", [([1.0], [2.0]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [5, 5, 5])])
def test_nan_when_undefined(x, y):
    result = spearman(x, y)
    assert math.isnan(result.rho) and math.isnan(result.p_value)


def test_lengths_must_match():
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])


def test_row_spearman_matches_the_scalar_one_per_row():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    b[1] = a[1] * 3 + 1  # a monotone copy
    b[2] = 7.0  # constant
    rho = row_spearman(a, b)
    assert rho.shape == (5,)
    assert rho[1] == pytest.approx(1.0) and math.isnan(rho[2])
    for i in (0, 3, 4):
        assert rho[i] == pytest.approx(spearman(a[i], b[i]).rho)
    with pytest.raises(ValueError, match="same shape"):
        row_spearman(a, b[:, :3])


def test_partial_rho_is_the_correlation_of_rank_residuals():
    """Partial Spearman of x and y given z equals the Pearson correlation of their ranks after regressing out z's."""
    from epviz.analysis.stats import partial_rho

    rng = np.random.default_rng(3)
    z = rng.normal(size=40)
    x, y = z + 0.5 * rng.normal(size=40), z + 0.5 * rng.normal(size=40)
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    residual = [r - np.polyval(np.polyfit(rz, r, 1), rz) for r in (rx, ry)]
    expected = np.corrcoef(*residual)[0, 1]
    got = partial_rho(spearman(x, y).rho, spearman(x, z).rho, spearman(y, z).rho)
    assert got == pytest.approx(expected, abs=1e-12)
    assert spearman(x, y).rho > 0.6 and abs(float(got)) < 0.4, "z explains most of the link"
    assert np.isnan(partial_rho(0.5, 1.0, 0.5)), "z that is x leaves nothing to correlate"
