"""Population Stability Index of every feature between a reference and a current histogram.

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i)

p_i and q_i are the reference's and the current's share of bin i. A bin empty on either side would
make the log infinite, so each share is floored at EPSILON = 1e-4 (the usual choice; shares are not
renormalised afterwards): an empty bin against a share of 10% contributes (0.1 - 1e-4) * ln(1000) ≈ 0.69.
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
def _psi(reference, current, bins, fold):
    check_same_shape(reference, current, bins)
    features = reference.shape[0]
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, fold)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        total = 0.0
        for index in range(bins):
            p = max(folded_count(reference, feature, index, bins, fold) / reference_total, EPSILON)
            q = max(folded_count(current, feature, index, bins, fold) / current_total, EPSILON)
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
        p = np.maximum(reference / reference.sum(axis=1, keepdims=True), EPSILON)
        q = np.maximum(current / current.sum(axis=1, keepdims=True), EPSILON)
        result = np.sum((q - p) * np.log(q / p), axis=1)
    empty = (reference.sum(axis=1) == 0) | (current.sum(axis=1) == 0)
    return np.where(empty, np.nan, result)


def psi_numpy(reference, current):
    """NumPy twin of `psi`."""
    return psi_table_numpy(fold_tails(reference), fold_tails(current))
