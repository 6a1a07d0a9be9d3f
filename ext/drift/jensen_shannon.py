"""Jensen-Shannon distance of every feature between a reference and a current histogram.

    JS(p, q) = sqrt((KL(p || m) + KL(q || m)) / 2),   m = (p + q) / 2,   natural logarithm

the same number as `scipy.spatial.distance.jensenshannon(p, q)` (default base e) on the same counts:
0 for equal shares, at most sqrt(ln 2) ≈ 0.833. Empty bins need no epsilon (0 · log 0 = 0, and m > 0
wherever p or q is). Divide by sqrt(ln 2) for a distance in [0, 1] (base 2).

`jensen_shannon(reference, current)` takes histograms int64[F, B+4]: BELOW folded into the first bin,
ABOVE into the last, NAN and INF left out. `jensen_shannon_table` takes frequency tables int64[F, K]. A
feature with no counted value on either side gets NaN.
"""

from __future__ import annotations

import numba
import numpy as np

from gateway.ext.drift.histogram import check_same_shape, count_tables_numpy, fold_tails, folded_count, folded_totals


@numba.njit(nogil=True, cache=True)
def _jensen_shannon(reference, current, bins, fold):
    check_same_shape(reference, current, bins)
    features = reference.shape[0]
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, fold)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        divergence = 0.0
        for index in range(bins):
            p = folded_count(reference, feature, index, bins, fold) / reference_total
            q = folded_count(current, feature, index, bins, fold) / current_total
            m = (p + q) / 2.0
            if p > 0.0:
                divergence += p * np.log(p / m)
            if q > 0.0:
                divergence += q * np.log(q / m)
        result[feature] = np.sqrt(max(divergence, 0.0) / 2.0)
    return result


@numba.njit(nogil=True, cache=True)
def jensen_shannon(reference, current):
    """float64[F]: Jensen-Shannon distance (base e) between histograms int64[F, B+4]."""
    return _jensen_shannon(reference, current, reference.shape[1] - 4, True)


@numba.njit(nogil=True, cache=True)
def jensen_shannon_table(reference, current):
    """float64[F]: Jensen-Shannon distance (base e) between frequency tables int64[F, K]."""
    return _jensen_shannon(reference, current, reference.shape[1], False)


def jensen_shannon_table_numpy(reference, current):
    """NumPy twin of `jensen_shannon_table`."""
    reference, current = count_tables_numpy(reference, current)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = reference / reference.sum(axis=1, keepdims=True)
        q = current / current.sum(axis=1, keepdims=True)
        m = (p + q) / 2.0
        terms = np.where(p > 0, p * np.log(p / m), 0.0) + np.where(q > 0, q * np.log(q / m), 0.0)
        result = np.sqrt(np.maximum(terms.sum(axis=1), 0.0) / 2.0)
    empty = (reference.sum(axis=1) == 0) | (current.sum(axis=1) == 0)
    return np.where(empty, np.nan, result)


def jensen_shannon_numpy(reference, current):
    """NumPy twin of `jensen_shannon`."""
    return jensen_shannon_table_numpy(fold_tails(reference), fold_tails(current))
