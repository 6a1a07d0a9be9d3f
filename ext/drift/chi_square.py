"""Chi-square statistic of homogeneity of every feature between a reference and a current count table.

The 2 x K contingency table (reference row, current row) of a feature gives

    X² = sum over rows r and columns k with a non-zero column total of (O_rk - E_rk)² / E_rk,
    E_rk = row_total_r * column_total_k / N

the statistic of `scipy.stats.chi2_contingency(table, correction=False)` with the all-zero columns
dropped, with (non-zero columns - 1) degrees of freedom. Meant for categorical features
(`chi_square_table` on categorical.py's buckets); `chi_square` takes histograms int64[F, B+4] with
BELOW folded into the first bin, ABOVE into the last, NAN and INF left out. The kernels return the
statistic; `chi_square_test` adds the p-value (computed here, without SciPy), off the hot path. A
feature with no counted value on either side gets NaN.

`chi_square_goodness` / `chi_square_goodness_table` are Evidently's chi-square (its `chisquare`
stattest, `scipy.stats.chisquare(f_obs, f_exp)`): the current counts against the counts the
reference's shares predict, E_k = reference_k * current_total / reference_total, over the bins
non-empty on either side, with (those bins - 1) degrees of freedom; a bin the reference never saw
but the current did gives +inf. It treats the reference as exact, so it is what people compare
with, while the drift stage's calibrated tests use the two-sample homogeneity statistic above.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from gateway.ext.drift.histogram import EXTRA_COLUMNS, check_same_shape, count_tables_numpy, fold_tails, folded_count, folded_totals


@numba.njit(nogil=True, cache=True)
def _chi_square(reference, current, bins, fold):
    check_same_shape(reference, current, bins)
    features = reference.shape[0]
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, fold)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        total = reference_total + current_total
        statistic = 0.0
        for index in range(bins):
            observed_reference = folded_count(reference, feature, index, bins, fold)
            observed_current = folded_count(current, feature, index, bins, fold)
            column = observed_reference + observed_current
            if column == 0.0:
                continue
            expected_reference = reference_total * column / total
            expected_current = current_total * column / total
            statistic += (observed_reference - expected_reference) ** 2 / expected_reference
            statistic += (observed_current - expected_current) ** 2 / expected_current
        result[feature] = statistic
    return result


@numba.njit(nogil=True, cache=True)
def chi_square(reference, current):
    """float64[F]: chi-square statistic of homogeneity between histograms int64[F, B+4]."""
    return _chi_square(reference, current, reference.shape[1] - EXTRA_COLUMNS, True)


@numba.njit(nogil=True, cache=True)
def chi_square_table(reference, current):
    """float64[F]: chi-square statistic of homogeneity between frequency tables int64[F, K]."""
    return _chi_square(reference, current, reference.shape[1], False)


@numba.njit(nogil=True, cache=True)
def _chi_square_goodness(reference, current, bins, fold):
    check_same_shape(reference, current, bins)
    features = reference.shape[0]
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, fold)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        scale = current_total / reference_total
        statistic = 0.0
        for index in range(bins):
            observed = folded_count(current, feature, index, bins, fold)
            expected = folded_count(reference, feature, index, bins, fold) * scale
            if expected > 0.0:
                statistic += (observed - expected) ** 2 / expected
            elif observed > 0.0:
                statistic = np.inf
        result[feature] = statistic
    return result


@numba.njit(nogil=True, cache=True)
def chi_square_goodness(reference, current):
    """float64[F]: Evidently's chi-square of the current histogram against the reference's shares."""
    return _chi_square_goodness(reference, current, reference.shape[1] - EXTRA_COLUMNS, True)


@numba.njit(nogil=True, cache=True)
def chi_square_goodness_table(reference, current):
    """float64[F]: Evidently's chi-square of a current frequency table against the reference's shares."""
    return _chi_square_goodness(reference, current, reference.shape[1], False)


def chi_square_goodness_table_numpy(reference, current):
    """NumPy twin of `chi_square_goodness_table`."""
    reference, current = count_tables_numpy(reference, current)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = reference * (current.sum(axis=1, keepdims=True) / reference.sum(axis=1, keepdims=True))
        terms = np.where(expected > 0, (current - expected) ** 2 / expected, np.where(current > 0, np.inf, 0.0))
    empty = (reference.sum(axis=1) == 0) | (current.sum(axis=1) == 0)
    return np.where(empty, np.nan, terms.sum(axis=1))


def chi_square_goodness_numpy(reference, current):
    """NumPy twin of `chi_square_goodness`."""
    return chi_square_goodness_table_numpy(fold_tails(reference), fold_tails(current))


def chi_square_table_numpy(reference, current):
    """NumPy twin of `chi_square_table`."""
    reference, current = count_tables_numpy(reference, current)
    rows = np.stack([reference, current], axis=1)  # [F, 2, K]
    row_totals = rows.sum(axis=2, keepdims=True)
    column_totals = rows.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = row_totals * column_totals / rows.sum(axis=(1, 2), keepdims=True)
        terms = np.where(column_totals > 0, (rows - expected) ** 2 / expected, 0.0)
    empty = (row_totals[:, :, 0] == 0).any(axis=1)
    return np.where(empty, np.nan, terms.sum(axis=(1, 2)))


def chi_square_numpy(reference, current):
    """NumPy twin of `chi_square`."""
    return chi_square_table_numpy(fold_tails(reference), fold_tails(current))


def degrees_of_freedom(reference, current) -> np.ndarray:
    """int64[F]: non-zero columns - 1 of each feature's table (pass frequency tables, or folded histograms)."""
    return (np.count_nonzero(np.asarray(reference) + np.asarray(current), axis=1) - 1).astype(np.int64)


def chi2_survival(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square with `dof` degrees of freedom (scipy.stats.chi2.sf).

    The regularized upper incomplete gamma Q(dof/2, statistic/2): its power series below a + 1,
    Lentz's continued fraction above (Numerical Recipes §6.2), to double precision. Here so the
    runtime package needs no SciPy; tests hold it to SciPy's.
    """
    a, x = dof / 2.0, statistic / 2.0
    if x <= 0.0:
        return 1.0
    if x == math.inf:
        return 0.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:  # series of P(a, x); Q = 1 - P
        term = total = 1.0 / a
        denominator = a
        for _ in range(10_000):
            denominator += 1.0
            term *= x / denominator
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300  # continued fraction of Q(a, x), modified Lentz
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    fraction = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        fraction *= step
        if abs(step - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * fraction


_chi2_survival = numba.njit(nogil=True, cache=True)(chi2_survival)  # the same code, compiled


@numba.njit(nogil=True, cache=True)
def chi2_survival_many(statistics, dof):
    """float64[F]: chi2_survival of each (statistic, dof); NaN where dof < 1 or the statistic is NaN."""
    result = np.empty(statistics.shape[0], np.float64)
    for index in range(statistics.shape[0]):
        if dof[index] >= 1 and not np.isnan(statistics[index]):
            result[index] = _chi2_survival(statistics[index], dof[index])
        else:
            result[index] = np.nan
    return result


def chi2_survival_many_numpy(statistics, dof):
    """Twin of `chi2_survival_many`: the plain Python `chi2_survival`, one at a time."""
    return np.array([chi2_survival(float(x), int(k)) if k >= 1 and not np.isnan(x) else np.nan
                     for x, k in zip(statistics, dof)], np.float64)


def chi_square_test(reference, current, histogram: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(statistic, p-value) float64[F] each; p is NaN where a feature has fewer than 2 non-zero columns."""
    if histogram:
        statistic = chi_square(reference, current)
        dof = degrees_of_freedom(fold_tails(reference), fold_tails(current))
    else:
        statistic = chi_square_table(reference, current)
        dof = degrees_of_freedom(reference, current)
    pvalue = np.array([chi2_survival(float(x), int(k)) if k >= 1 and np.isfinite(x) else np.nan
                       for x, k in zip(statistic, dof)])
    return statistic, pvalue
