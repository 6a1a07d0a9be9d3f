"""Kolmogorov-Smirnov statistic of every feature from a reference and a current histogram.

    KS = max over the edges e_0 … e_B of |F_ref(e_i) - F_cur(e_i)|

F is the share of counted values left of an edge: BELOW counts left of e_0 (it is), bins 0..i-1 left of
e_i, ABOVE right of e_B; NAN and INF are left out. The CDFs are exact at the edges, so this is the
two-sample statistic of `scipy.stats.ks_2samp` on the raw values restricted to the edges: it is never
larger, and smaller by at most the larger share of one bin (between two edges each CDF moves by at
most its bin's share). With quantile edges of B bins that is about 1/B. A feature with no counted
value on either side gets NaN.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from gateway.ext.drift.histogram import ABOVE, BELOW, EXTRA_COLUMNS, folded_totals


@numba.njit(nogil=True, cache=True)
def ks(reference, current):
    """float64[F]: binned two-sample KS statistic between histograms int64[F, B+4]."""
    features = reference.shape[0]
    bins = reference.shape[1] - EXTRA_COLUMNS
    if current.shape[0] != features or current.shape[1] != reference.shape[1] or bins < 1:
        raise ValueError("reference and current must be histograms int64[F, B+4] of the same shape")
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, True)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        reference_below = np.float64(reference[feature, bins])
        current_below = np.float64(current[feature, bins])
        largest = abs(reference_below / reference_total - current_below / current_total)
        for index in range(bins):
            reference_below += reference[feature, index]
            current_below += current[feature, index]
            largest = max(largest, abs(reference_below / reference_total - current_below / current_total))
        result[feature] = largest
    return result


def ks_numpy(reference, current):
    """NumPy twin of `ks`."""
    reference, current = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    if reference.shape != current.shape or reference.shape[1] < 5:
        raise ValueError("reference and current must be histograms int64[F, B+4] of the same shape")

    def cdf_at_edges(counts):
        ordered = np.concatenate([counts[:, BELOW:ABOVE], counts[:, :-EXTRA_COLUMNS]], axis=1)  # BELOW, then the bins
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.cumsum(ordered, axis=1) / counts[:, :-2].sum(axis=1, keepdims=True)

    with np.errstate(invalid="ignore"):
        return np.max(np.abs(cdf_at_edges(reference) - cdf_at_edges(current)), axis=1)


def kolmogorov_survival(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution K (scipy.stats.kstwobign.sf), without SciPy.

    Two series, each fast where the other is slow: 1 - sqrt(2 pi)/x sum exp(-(2k-1)² pi² / (8 x²))
    below x = 1.18, and 2 sum (-1)^(k-1) exp(-2 k² x²) above; both to double precision.
    """
    if x <= 0.0:
        return 1.0
    if x < 1.18:
        factor = -math.pi ** 2 / (8.0 * x * x)
        total = sum(math.exp(factor * (2 * k - 1) ** 2) for k in range(1, 8))
        return max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / x * total)
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-300 or term < abs(total) * 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_pvalue(statistic: float, reference_rows: float, current_rows: float) -> float:
    """Asymptotic p-value of a two-sample KS statistic: P(K > sqrt(n_eff) D), n_eff = n m / (n + m).

    The effective sample size counts both samples, so a small reference widens the test as it should.
    At finite n the limiting law's tail is heavier than the exact one, and the binned statistic is
    never above the exact one (module docstring): the p-value is conservative (too large), never
    too small, which is the side a false-alarm budget needs. NaN for a NaN statistic or an empty side.
    """
    if not (statistic == statistic) or reference_rows <= 0 or current_rows <= 0:
        return math.nan
    effective = reference_rows * current_rows / (reference_rows + current_rows)
    return kolmogorov_survival(math.sqrt(effective) * statistic)


@functools.lru_cache(maxsize=64)
def kolmogorov_quantile(probability: float) -> float:
    """x with P(K > x) = probability (scipy.stats.kstwobign.isf), by bisection on kolmogorov_survival."""
    low, high = 0.0, 10.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if kolmogorov_survival(middle) > probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def ks_pvalue_given_reference(statistic: float, reference_rows: float, current_rows: float, band: float) -> float:
    """P-value of a window's KS statistic against a fixed reference, valid for that reference.

    The reference is a sample too, fixed for every window compared with it: a test at the two-sample
    effective size is right on average over references, but one unlucky reference would raise the
    false alarms of every window after it. Given a reference whose empirical CDF lies within its own
    band sup|F_m - F| <= c/sqrt(m), c = kolmogorov_quantile(band) (true for all but `band` of
    references), sup|F_n - F_m| > D implies sup|F_n - F| > D - c/sqrt(m): so
    p = P(K > sqrt(n) (D - c/sqrt(m))), conservative, and the window alone is random.
    """
    if not (statistic == statistic) or reference_rows <= 0 or current_rows <= 0:
        return math.nan
    margin = kolmogorov_quantile(band) / math.sqrt(reference_rows)
    return kolmogorov_survival(math.sqrt(current_rows) * max(statistic - margin, 0.0))
