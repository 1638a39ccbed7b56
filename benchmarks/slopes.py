"""How a cost grows with size: log-log slopes, and the quadratic term of a total time.

A time per token proportional to L^s has slope s on log-log axes: s = 1 for re-forwarding the whole
prefix (quadratic in total), s = 0 for recurrent decoding (constant per token). ``fit_slope`` fits
log t = s log L + c by least squares (numpy.polyfit) and gives s a confidence interval from the
residuals (Student's t with n - 2 degrees of freedom).

A total time (generating L tokens) is a + b L + c L^2: a fixed cost, a cost per token, and for
re-forwarding a cost per token that grows with the prefix. Where a and b L are most of the time, a
log-log slope of the total lies between 1 and 2 and says little; ``fit_quadratic`` fits the three
terms (scipy.optimize.curve_fit) and says whether c is resolved (its interval excludes 0) and from
which L the c L^2 term is the larger part.
"""

import math

import numpy as np
from scipy import optimize, stats


def _t_cdf(x, df):
    """Student's t distribution function at x >= 0, by Simpson's rule on its density (no scipy needed)."""
    grid = np.linspace(0.0, x, 4001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    h = grid[1] - grid[0]
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())


def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection on _t_cdf."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _checked(where, L, t, sizes):
    """L and t as float arrays; ValueError unless 1-d, of one length, positive, finite, with ``sizes``
    distinct sizes at least."""
    L, t = np.asarray(L, dtype=float), np.asarray(t, dtype=float)
    if L.shape != t.shape or L.ndim != 1:
        raise ValueError(f"{where}: L and t must be 1-d of the same length, got {L.shape} and {t.shape}")
    if not (np.isfinite(L).all() and np.isfinite(t).all() and (L > 0).all() and (t > 0).all()):
        raise ValueError(f"{where}: L and t must be positive and finite")
    if len(np.unique(L)) < sizes:
        raise ValueError(f"{where}: need at least {sizes} distinct sizes")
    return L, t


def fit_slope(L, t, confidence=0.95):
    """Fit t = C * L^slope on log-log axes.

    Args:
        L: sizes (> 0), at least two distinct; t: times (> 0), same length; confidence: of the interval
    Returns:
        dict(slope, intercept (natural log of C), stderr, ci_low, ci_high, confidence, n, r2);
        with only two points the interval is unknown (stderr, ci_low, ci_high are NaN).
    """
    L, t = _checked("fit_slope", L, t, 2)
    x, y = np.log(L), np.log(t)
    slope, intercept = np.polyfit(x, y, 1)
    n = len(x)
    residuals = y - (slope * x + intercept)
    ss_res = float(residuals @ residuals)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    sxx = float(((x - x.mean()) ** 2).sum())
    if n > 2:
        stderr = math.sqrt(ss_res / (n - 2) / sxx)
        half = t_quantile(0.5 + confidence / 2, n - 2) * stderr
    else:
        stderr = half = float("nan")
    return dict(slope=float(slope), intercept=float(intercept), stderr=stderr, ci_low=float(slope - half),
                ci_high=float(slope + half), confidence=confidence, n=n,
                r2=1 - ss_res / ss_tot if ss_tot > 0 else 1.0)


def fit_quadratic(L, t, confidence=0.95):
    """Fit t = a + b L + c L^2 by weighted least squares (scipy.optimize.curve_fit).

    Timing noise is a share of the time, so each point is weighted by its own time (sigma = t:
    relative residuals), and the covariance is scaled by the residuals (absolute_sigma=False). c's
    interval uses Student's t with n - 3 degrees of freedom (scipy.stats.t).

    Args:
        L: sizes (> 0), at least four distinct; t: times (> 0), same length; confidence: of c's interval
    Returns:
        dict(a, b, c, c_stderr, c_low, c_high, confidence, n,
             c_sign: "positive" or "negative" when the interval excludes 0, else "not resolved",
             L_star: the L from which c L^2 > a + b L (the largest root of c L^2 = a + b L; 0.0 when
                     c L^2 is larger at every L > 0), None unless c_sign is "positive")
    """
    L, t = _checked("fit_quadratic", L, t, 4)
    # in units of the largest L and t, so that the three columns are of one scale
    l_unit, t_unit = L.max(), t.max()
    x, y = L / l_unit, t / t_unit
    (a, b, c), cov = optimize.curve_fit(lambda x, a, b, c: a + b * x + c * x * x, x, y, p0=(0.0, 0.0, 0.0), sigma=y,
                                        absolute_sigma=False,
                                        jac=lambda x, a, b, c: np.stack([np.ones_like(x), x, x * x], axis=1))
    a, b, c = a * t_unit, b * t_unit / l_unit, c * t_unit / l_unit ** 2
    c_stderr = float(math.sqrt(cov[2, 2]) * t_unit / l_unit ** 2)
    half = stats.t.ppf(0.5 + confidence / 2, len(L) - 3) * c_stderr
    c_low, c_high = c - half, c + half
    sign = "positive" if c_low > 0 else "negative" if c_high < 0 else "not resolved"
    L_star = None
    if sign == "positive":
        roots = np.roots([c, -b, -a])
        real = roots[np.isreal(roots)].real
        L_star = max(0.0, float(real.max())) if len(real) else 0.0
    return dict(a=float(a), b=float(b), c=float(c), c_stderr=c_stderr, c_low=float(c_low), c_high=float(c_high),
                confidence=confidence, n=len(L), c_sign=sign, L_star=L_star)
