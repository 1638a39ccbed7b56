"""fit_slope recovers known growth rates, and its interval is honest."""

import math

import numpy as np
import pytest

from benchmarks.slopes import fit_slope, t_quantile

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
