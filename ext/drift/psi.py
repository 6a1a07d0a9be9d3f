"""Population Stability Index of every feature between a reference and a current histogram.

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i)

p_i and q_i are the reference's and the current's share of bin i. A bin empty on one side would make
the log infinite, so, as Evidently does (`get_binned_data(..., feel_zeroes=True)`), each side's zero
shares are replaced by EPSILON = 1e-4, or by that side's smallest non-zero share / 1e6 where that
share is <= 1e-4 (shares are not renormalised afterwards); a bin empty on both sides is left out
(Evidently's bins are the values seen). An empty bin against a share of 10% contributes
(0.1 - 1e-4) * ln(1000) ≈ 0.69. The same number as Evidently's `psi` stattest on the bin numbers.
Rule of thumb: < 0.1 stable, 0.1-0.25 drifting, > 0.25 shifted.

`psi(reference, current)` takes histograms int64[F, B+4] (histogram.py): BELOW is folded into the first
bin and ABOVE into the last (a value out of the reference's range is evidence of drift, and it lies
nearest those bins); NAN and INF are left out (watch them with their own counters). `psi_table` takes
plain frequency tables int64[F, K] (categorical.py). A feature with no counted value on either side
gets NaN.
"""

from __future__ import annotations

import numba
import numpy as np

from gateway.ext.drift.histogram import EXTRA_COLUMNS, check_same_shape, count_tables_numpy, fold_tails, folded_count, folded_totals

EPSILON = 1e-4


@numba.njit(nogil=True, cache=True)
def _zero_share(counts, feature, bins, fold, total):
    """What an empty bin's share becomes on this side: EPSILON, or the smallest non-zero share / 1e6."""
    smallest = np.inf
    for index in range(bins):
        count = folded_count(counts, feature, index, bins, fold)
        if count > 0.0:
            smallest = min(smallest, count / total)
    return smallest / 1e6 if smallest <= EPSILON else EPSILON


@numba.njit(nogil=True, cache=True)
def _psi(reference, current, bins, fold):
    check_same_shape(reference, current, bins)
    features = reference.shape[0]
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, fold)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        reference_zero = _zero_share(reference, feature, bins, fold, reference_total)
        current_zero = _zero_share(current, feature, bins, fold, current_total)
        total = 0.0
        for index in range(bins):
            p = folded_count(reference, feature, index, bins, fold) / reference_total
            q = folded_count(current, feature, index, bins, fold) / current_total
            if p == 0.0 and q == 0.0:
                continue
            p = p if p > 0.0 else reference_zero
            q = q if q > 0.0 else current_zero
            total += (q - p) * np.log(q / p)
        result[feature] = total
    return result


@numba.njit(nogil=True, cache=True)
def psi(reference, current):
    """float64[F]: PSI between histograms int64[F, B+4] (tails folded, NaN/inf left out)."""
    return _psi(reference, current, reference.shape[1] - EXTRA_COLUMNS, True)


@numba.njit(nogil=True, cache=True)
def psi_table(reference, current):
    """float64[F]: PSI between frequency tables int64[F, K]."""
    return _psi(reference, current, reference.shape[1], False)


def psi_table_numpy(reference, current):
    """NumPy twin of `psi_table`."""
    reference, current = count_tables_numpy(reference, current)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = reference / reference.sum(axis=1, keepdims=True)
        q = current / current.sum(axis=1, keepdims=True)
        p = np.where(p > 0, p, _zero_shares_numpy(p))
        q = np.where(q > 0, q, _zero_shares_numpy(q))
        terms = np.where((reference > 0) | (current > 0), (q - p) * np.log(q / p), 0.0)
        result = terms.sum(axis=1)
    empty = (reference.sum(axis=1) == 0) | (current.sum(axis=1) == 0)
    return np.where(empty, np.nan, result)


def psi_numpy(reference, current):
    """NumPy twin of `psi`."""
    return psi_table_numpy(fold_tails(reference), fold_tails(current))


def _zero_shares_numpy(shares):
    smallest = np.where(shares > 0, shares, np.inf).min(axis=1, keepdims=True)
    return np.where(smallest <= EPSILON, smallest / 1e6, EPSILON)
