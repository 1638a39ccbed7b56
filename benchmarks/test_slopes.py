"""fit_slope recovers known growth rates, and its interval is honest."""

import math

import numpy as np
import pytest

from benchmarks.slopes import fit_quadratic, fit_slope, t_quantile

L = 2.0 ** np.arange(6, 14)


@pytest.mark.parametrize("power", [0, 1, 2])
def test_exact_powers(power):
    fit = fit_slope(L, 3e-6 * L ** power)
    assert fit["slope"] == pytest.approx(power, abs=1e-9)
    assert fit["intercept"] == pytest.approx(math.log(3e-6), abs=1e-9)
    assert fit["ci_high"] - fit["ci_low"] < 1e-6 and fit["r2"] == pytest.approx(1.0)


def test_noisy_linear_interval_covers_one():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        fit = fit_slope(L, 1e-5 * L * np.exp(rng.normal(0, 0.1, len(L))))
        covered += fit["ci_low"] <= 1 <= fit["ci_high"]
    assert 0.9 <= covered / 200 <= 0.99  # a 95 % interval


def test_constant_plus_overhead_is_flat():
    fit = fit_slope(L, 2e-5 + 0 * L)
    assert abs(fit["slope"]) < 1e-9


def test_t_quantiles():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 6) == pytest.approx(2.447, abs=1e-3)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962, abs=1e-3)


def test_two_points_have_no_interval_and_bad_input_is_refused():
    fit = fit_slope([1, 2], [1, 2])
    assert fit["slope"] == pytest.approx(1) and math.isnan(fit["ci_low"])
    with pytest.raises(ValueError):
        fit_slope([4, 4], [1, 2])
    with pytest.raises(ValueError):
        fit_slope([1, 2], [0, 1])


# ------------------------------------------------------------------- fit_quadratic

LQ = 2.0 ** np.arange(3, 9)        # 8 ... 256: the default sweep's re-forward lengths


def hand_L_star(a, b, c):
    """The positive root of c L^2 = a + b L, by the quadratic formula."""
    return (b + math.sqrt(b * b + 4 * a * c)) / (2 * c)


@pytest.mark.parametrize("a, b, c, L_star", [(5e-3, 5e-5, 1e-6, 100.0),                # c 100^2 = 5e-3 + 5e-5 100
                                             (2e-3, 1e-4, 3e-7, hand_L_star(2e-3, 1e-4, 3e-7))])
def test_quadratic_recovers_known_terms_and_L_star(a, b, c, L_star):
    fit = fit_quadratic(LQ, a + b * LQ + c * LQ ** 2)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((a, b, c), rel=1e-6)
    assert fit["c_low"] <= c <= fit["c_high"] and fit["c_sign"] == "positive"
    assert fit["L_star"] == pytest.approx(L_star, rel=1e-6)


def test_noisy_quadratic_interval_covers_c():
    """Timing noise as a share of the time: the 95 % interval of c holds the generating c in about 95 %
    of series, and the fitted c lies inside its own interval."""
    a, b, c = 5e-3, 5e-5, 1e-6
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(300):
        fit = fit_quadratic(LQ, (a + b * LQ + c * LQ ** 2) * np.exp(rng.normal(0, 0.05, len(LQ))))
        covered += fit["c_low"] <= c <= fit["c_high"]
        assert fit["c_low"] < fit["c"] < fit["c_high"]
    assert 0.9 <= covered / 300 <= 0.99


def test_linear_series_leaves_c_unresolved():
    """a + b L with noise (recurrent decoding): c's interval holds 0 in about 95 % of series, and then
    there is no L_star."""
    L = 2.0 ** np.arange(3, 11)
    rng = np.random.default_rng(1)
    unresolved = 0
    for _ in range(300):
        fit = fit_quadratic(L, (4e-3 + 3e-4 * L) * np.exp(rng.normal(0, 0.05, len(L))))
        unresolved += fit["c_sign"] == "not resolved"
        assert (fit["L_star"] is None) == (fit["c_sign"] != "positive")
    assert 0.9 <= unresolved / 300 <= 0.99


def test_quadratic_needs_four_lengths():
    with pytest.raises(ValueError, match="at least 4 distinct sizes"):
        fit_quadratic([8, 16, 32, 32], [1, 2, 3, 3])
    with pytest.raises(ValueError):
        fit_quadratic([8, 16, 32, 64], [1, 2, 0, 4])
