"""Wasserstein-1 (earth mover's) distance of every feature from a reference and a current histogram.

    W1 = integral of |F_ref(x) - F_cur(x)| dx

with each CDF exact at the edges (as in ks.py: BELOW counted left of e_0, ABOVE right of e_B) and
linear inside each bin (its values spread evenly over the bin). The integral of |D| over a bin, where
the CDF difference D goes linearly from d0 to d1 over width w, is w (|d0| + |d1|) / 2 when d0 and d1
have the same sign, and w (d0² + d1²) / (2 (|d0| + |d1|)) when D crosses zero inside. Out-of-range
values are taken to sit at the edge they passed (their true distance is unknown to a histogram), so
values far outside the reference range are under-counted; NAN and INF are left out. In units of the
feature; a feature with no counted value on either side gets NaN.
"""

from __future__ import annotations

import numba
import numpy as np

from gateway.ext.drift.histogram import ABOVE, BELOW, EXTRA_COLUMNS


@numba.njit(nogil=True, cache=True)
def _segment(d0, d1, width):
    """Integral of |D| over a bin where D is linear from d0 to d1."""
    a0 = abs(d0)
    a1 = abs(d1)
    if a0 + a1 == 0.0:
        return 0.0
    if (d0 >= 0.0) == (d1 >= 0.0):
        return width * (a0 + a1) / 2.0
    return width * (d0 * d0 + d1 * d1) / (2.0 * (a0 + a1))


@numba.njit(nogil=True, cache=True)
def wasserstein(reference, current, edges):
    """float64[F]: binned Wasserstein-1 distance between histograms int64[F, B+4] over `edges[F, B+1]`."""
    features = reference.shape[0]
    bins = reference.shape[1] - EXTRA_COLUMNS
    if (current.shape[0] != features or current.shape[1] != reference.shape[1] or bins < 1
            or edges.shape[0] != features or edges.shape[1] != bins + 1):
        raise ValueError("reference, current must be histograms int64[F, B+4] over edges float64[F, B+1]")
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total = 0.0
        current_total = 0.0
        for index in range(bins + 2):
            reference_total += reference[feature, index]
            current_total += current[feature, index]
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        reference_below = np.float64(reference[feature, bins])
        current_below = np.float64(current[feature, bins])
        difference = reference_below / reference_total - current_below / current_total
        distance = 0.0
        for index in range(bins):
            reference_below += reference[feature, index]
            current_below += current[feature, index]
            next_difference = reference_below / reference_total - current_below / current_total
            distance += _segment(difference, next_difference, edges[feature, index + 1] - edges[feature, index])
            difference = next_difference
        result[feature] = distance
    return result


def wasserstein_numpy(reference, current, edges):
    """NumPy twin of `wasserstein`."""
    reference, current, edges = (np.asarray(a, np.float64) for a in (reference, current, edges))
    if reference.shape != current.shape or edges.shape != (reference.shape[0], reference.shape[1] - 3):
        raise ValueError("reference, current must be histograms int64[F, B+4] over edges float64[F, B+1]")

    def cdf_at_edges(counts):
        ordered = np.concatenate([counts[:, BELOW:ABOVE], counts[:, :-EXTRA_COLUMNS]], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.cumsum(ordered, axis=1) / counts[:, :-2].sum(axis=1, keepdims=True)

    difference = cdf_at_edges(reference) - cdf_at_edges(current)
    d0, d1, width = difference[:, :-1], difference[:, 1:], np.diff(edges, axis=1)
    a0, a1 = np.abs(d0), np.abs(d1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = width * (d0 * d0 + d1 * d1) / (2.0 * (a0 + a1))
    same_sign = (d0 >= 0) == (d1 >= 0)
    segments = np.where(a0 + a1 == 0, 0.0, np.where(same_sign, width * (a0 + a1) / 2.0, crossing))
    return segments.sum(axis=1)
