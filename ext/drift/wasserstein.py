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

from gateway.ext.drift.histogram import ABOVE, BELOW, EXTRA_COLUMNS, folded_totals


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
        reference_total, current_total = folded_totals(reference, current, feature, bins, True)
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


# ------------------------------------------------------------------ exact tails (fine CDF bins)
# With `update_cdf`'s tail sums (float64[F, 2]: the sum of the values left of e_1, and right of
# e_B-1), the integral of each CDF over the outer regions is exact:
#     ∫_{-inf}^{e_1} F(x) dx     = sum over x < e_1 of (e_1 - x) / n   = (k_left e_1 - S_left) / n
#     ∫_{e_B-1}^{inf} 1 - F(x) dx = sum over x >= e_B-1 of (x - e_B-1) / n = (S_right - k_right e_B-1) / n
# so the signed integral of D = F_ref - F_cur over each outer region is exact, and |it| is that
# region's share of W1 whenever D keeps its sign there (it is a lower bound otherwise). Values
# beyond the reference's range count at their true distance: a Cauchy tail is no longer cut off at
# the edge, nor smeared across a wide outer bin. The interior bins are linear as in `wasserstein`.


@numba.njit(nogil=True, cache=True)
def wasserstein_tails(reference, current, edges, reference_tails, current_tails):
    """float64[F]: Wasserstein-1 between histograms int64[F, B+4] (B >= 2) with exact outer regions."""
    features = reference.shape[0]
    bins = reference.shape[1] - EXTRA_COLUMNS
    if (current.shape[0] != features or current.shape[1] != reference.shape[1] or bins < 2
            or edges.shape[0] != features or edges.shape[1] != bins + 1
            or reference_tails.shape[0] != features or current_tails.shape[0] != features
            or reference_tails.shape[1] != 2 or current_tails.shape[1] != 2):
        raise ValueError("reference, current must be histograms int64[F, B+4] (B >= 2) over edges float64[F, B+1], "
                         "with tails float64[F, 2]")
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, True)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        first, last = edges[feature, 1], edges[feature, bins - 1]
        reference_left = np.float64(reference[feature, bins] + reference[feature, 0])
        current_left = np.float64(current[feature, bins] + current[feature, 0])
        left = ((reference_left * first - reference_tails[feature, 0]) / reference_total
                - (current_left * first - current_tails[feature, 0]) / current_total)
        reference_right = np.float64(reference[feature, bins + 1] + reference[feature, bins - 1])
        current_right = np.float64(current[feature, bins + 1] + current[feature, bins - 1])
        right = ((current_tails[feature, 1] - current_right * last) / current_total
                 - (reference_tails[feature, 1] - reference_right * last) / reference_total)
        distance = abs(left) + abs(right)
        reference_below = reference_left
        current_below = current_left
        difference = reference_below / reference_total - current_below / current_total
        for index in range(1, bins - 1):
            reference_below += reference[feature, index]
            current_below += current[feature, index]
            next_difference = reference_below / reference_total - current_below / current_total
            distance += _segment(difference, next_difference, edges[feature, index + 1] - edges[feature, index])
            difference = next_difference
        result[feature] = distance
    return result


def wasserstein_tails_numpy(reference, current, edges, reference_tails, current_tails):
    """NumPy twin of `wasserstein_tails`."""
    reference, current, edges = (np.asarray(a, np.float64) for a in (reference, current, edges))
    reference_tails, current_tails = np.asarray(reference_tails, np.float64), np.asarray(current_tails, np.float64)
    features, bins = reference.shape[0], reference.shape[1] - EXTRA_COLUMNS
    if (reference.shape != current.shape or bins < 2 or edges.shape != (features, bins + 1)
            or reference_tails.shape != (features, 2) or current_tails.shape != (features, 2)):
        raise ValueError("reference, current must be histograms int64[F, B+4] (B >= 2) over edges float64[F, B+1], "
                         "with tails float64[F, 2]")

    def outer_integrals(counts, tails):
        with np.errstate(divide="ignore", invalid="ignore"):
            total = counts[:, :-2].sum(axis=1)
            left = ((counts[:, BELOW] + counts[:, 0]) * edges[:, 1] - tails[:, 0]) / total
            right = (tails[:, 1] - (counts[:, ABOVE] + counts[:, bins - 1]) * edges[:, bins - 1]) / total
        return left, right

    reference_left, reference_right = outer_integrals(reference, reference_tails)
    current_left, current_right = outer_integrals(current, current_tails)
    inner = _inner_numpy(reference, current, edges)
    return np.abs(reference_left - current_left) + np.abs(current_right - reference_right) + inner


def _inner_numpy(reference, current, edges):
    """Linear-CDF W1 over the interior bins 1 … B-2 (edges e_1 … e_B-1)."""
    bins = reference.shape[1] - EXTRA_COLUMNS

    def cdf_at_inner_edges(counts):
        left = (counts[:, BELOW] + counts[:, 0])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.cumsum(np.concatenate([left, counts[:, 1:bins - 1]], axis=1), axis=1) / counts[:, :-2].sum(axis=1, keepdims=True)

    difference = cdf_at_inner_edges(reference) - cdf_at_inner_edges(current)
    d0, d1, width = difference[:, :-1], difference[:, 1:], np.diff(edges[:, 1:bins], axis=1)
    a0, a1 = np.abs(d0), np.abs(d1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = width * (d0 * d0 + d1 * d1) / (2.0 * (a0 + a1))
    same_sign = (d0 >= 0) == (d1 >= 0)
    segments = np.where(a0 + a1 == 0, 0.0, np.where(same_sign, width * (a0 + a1) / 2.0, crossing))
    return segments.sum(axis=1)


@numba.njit(nogil=True, cache=True)
def wasserstein_inner(reference, current, edges):
    """float64[F]: the part of `wasserstein_tails` over the interior bins 1 … B-2 only (CDFs linear
    inside each), for callers that integrate the outer regions from the outer values themselves."""
    features = reference.shape[0]
    bins = reference.shape[1] - EXTRA_COLUMNS
    if (current.shape[0] != features or current.shape[1] != reference.shape[1] or bins < 2
            or edges.shape[0] != features or edges.shape[1] != bins + 1):
        raise ValueError("reference, current must be histograms int64[F, B+4] (B >= 2) over edges float64[F, B+1]")
    result = np.empty(features, np.float64)
    for feature in range(features):
        reference_total, current_total = folded_totals(reference, current, feature, bins, True)
        if reference_total == 0.0 or current_total == 0.0:
            result[feature] = np.nan
            continue
        reference_below = np.float64(reference[feature, bins] + reference[feature, 0])
        current_below = np.float64(current[feature, bins] + current[feature, 0])
        difference = reference_below / reference_total - current_below / current_total
        distance = 0.0
        for index in range(1, bins - 1):
            reference_below += reference[feature, index]
            current_below += current[feature, index]
            next_difference = reference_below / reference_total - current_below / current_total
            distance += _segment(difference, next_difference, edges[feature, index + 1] - edges[feature, index])
            difference = next_difference
        result[feature] = distance
    return result


def wasserstein_inner_numpy(reference, current, edges):
    """NumPy twin of `wasserstein_inner`."""
    reference, current, edges = (np.asarray(a, np.float64) for a in (reference, current, edges))
    if reference.shape != current.shape or reference.shape[1] < 6 or edges.shape != (reference.shape[0], reference.shape[1] - 3):
        raise ValueError("reference, current must be histograms int64[F, B+4] (B >= 2) over edges float64[F, B+1]")
    empty = (reference[:, :-2].sum(axis=1) == 0) | (current[:, :-2].sum(axis=1) == 0)
    return np.where(empty, np.nan, _inner_numpy(reference, current, edges))


@numba.njit(nogil=True, cache=True)
def outer_regions_exact(reference_values, current_values, reference_rows, current_rows, first, last):
    """∫ |F_ref - F_cur| over (-inf, e_1) and [e_B-1, inf), exactly, from every value there (see the twin)."""
    reference_sorted = np.sort(reference_values)
    current_sorted = np.sort(current_values)
    total = 0.0
    # left of e_1, ascending: on [p, v) each CDF is (values <= p) / n
    i = j = 0
    below_reference = below_current = 0.0
    low = first
    if reference_sorted.size and reference_sorted[0] < low:
        low = reference_sorted[0]
    if current_sorted.size and current_sorted[0] < low:
        low = current_sorted[0]
    point = low
    while True:
        next_reference = reference_sorted[i] if i < reference_sorted.size and reference_sorted[i] < first else np.inf
        next_current = current_sorted[j] if j < current_sorted.size and current_sorted[j] < first else np.inf
        value = min(next_reference, next_current, first)
        total += (value - point) * abs(below_reference / reference_rows - below_current / current_rows)
        if value >= first:
            break
        while i < reference_sorted.size and reference_sorted[i] == value:
            below_reference += 1.0
            i += 1
        while j < current_sorted.size and current_sorted[j] == value:
            below_current += 1.0
            j += 1
        point = value
    # right of e_B-1, ascending: on [p, v) each 1 - F is (values > p) / n
    i = np.searchsorted(reference_sorted, last, side="right")
    j = np.searchsorted(current_sorted, last, side="right")
    above_reference = np.float64(reference_sorted.size - i)
    above_current = np.float64(current_sorted.size - j)
    point = last
    while i < reference_sorted.size or j < current_sorted.size:
        next_reference = reference_sorted[i] if i < reference_sorted.size else np.inf
        next_current = current_sorted[j] if j < current_sorted.size else np.inf
        value = min(next_reference, next_current)
        total += (value - point) * abs(above_reference / reference_rows - above_current / current_rows)
        while i < reference_sorted.size and reference_sorted[i] == value:
            above_reference -= 1.0
            i += 1
        while j < current_sorted.size and current_sorted[j] == value:
            above_current -= 1.0
            j += 1
        point = value
    return total


def outer_regions_exact_numpy(reference_values, current_values, reference_rows: float, current_rows: float,
                              first: float, last: float) -> float:
    """∫ |F_ref - F_cur| over (-inf, e_1) and [e_B-1, inf), exactly, from every value there.

    Left of e_1, F(x) = #(values <= x) / n counts only values left of e_1; right of e_B-1,
    1 - F(x) = #(values > x) / n only values right of it: so those values (and the row totals) are
    all the integral needs. Plain NumPy, off the hot path: a window has ~2 n / B of them.
    """
    reference_values = np.asarray(reference_values, np.float64)
    current_values = np.asarray(current_values, np.float64)

    def region(reference_side, current_side, low, high, right):
        points = np.unique(np.concatenate([reference_side, current_side, [low, high]]))
        points = points[(points >= low) & (points <= high)]
        if points.size < 2:
            return 0.0
        sample = points[:-1]
        if right:  # 1 - F(x) on [x_k, x_k+1): values > x_k
            reference_share = (reference_side.size - np.searchsorted(np.sort(reference_side), sample, side="right")) / reference_rows
            current_share = (current_side.size - np.searchsorted(np.sort(current_side), sample, side="right")) / current_rows
        else:  # F(x) on [x_k, x_k+1): values <= x_k
            reference_share = np.searchsorted(np.sort(reference_side), sample, side="right") / reference_rows
            current_share = np.searchsorted(np.sort(current_side), sample, side="right") / current_rows
        return float(np.sum(np.abs(reference_share - current_share) * np.diff(points)))

    left = region(reference_values[reference_values < first], current_values[current_values < first],
                  min(reference_values.min(initial=first), current_values.min(initial=first)), first, False)
    right = region(reference_values[reference_values >= last], current_values[current_values >= last],
                   last, max(reference_values.max(initial=last), current_values.max(initial=last)), True)
    return left + right
