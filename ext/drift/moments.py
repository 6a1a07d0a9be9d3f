"""Running count, mean and variance of every feature (Welford/Chan), mergeable across blocks and workers.

State of F features: `float64[F, 3]`, columns COUNT, MEAN, M2 (sum of squared deviations from the
mean), so variance = M2 / count (population, as np.var) or M2 / (count - 1) (sample). NaN and ±inf
are skipped: they are counted by the histogram, not averaged.

A block is reduced to its own (count, mean, M2) in two passes (sum, then squared deviations from the
block mean: no per-value division, no cancellation) and combined with the state by Chan et al.'s
pairwise formula, which is Welford's update generalised to blocks. The same formula merges two states.
"""

from __future__ import annotations

import numba
import numpy as np

COUNT, MEAN, M2 = 0, 1, 2

_SHAPE_ERROR = "moments shapes must be state float64[F, 3] and block [R, F]"


@numba.njit(nogil=True, cache=True)
def _combine(state, feature, count, mean, m2):
    """Chan's combination of state[feature] with (count, mean, m2), written into state[feature]."""
    if count == 0.0:
        return
    total = state[feature, 0] + count
    delta = mean - state[feature, 1]
    state[feature, 2] += m2 + delta * delta * state[feature, 0] * count / total
    state[feature, 1] += delta * count / total
    state[feature, 0] = total


@numba.njit(nogil=True, cache=True)
def update_moments(state, block):
    """Add the finite values of `block[R, F]` to `state[F, 3]` in place; returns `state`."""
    features = state.shape[0]
    if state.shape[1] != 3 or block.shape[1] != features:
        raise ValueError(_SHAPE_ERROR)
    counts = np.zeros(features, np.float64)
    sums = np.zeros(features, np.float64)
    for row in range(block.shape[0]):
        for feature in range(features):
            value = np.float64(block[row, feature])
            if abs(value) < np.inf:  # False for NaN and ±inf
                counts[feature] += 1.0
                sums[feature] += value
    squares = np.zeros(features, np.float64)
    for feature in range(features):
        if counts[feature] > 0.0:
            sums[feature] /= counts[feature]  # now the block mean
    for row in range(block.shape[0]):
        for feature in range(features):
            value = np.float64(block[row, feature])
            if abs(value) < np.inf:
                deviation = value - sums[feature]
                squares[feature] += deviation * deviation
    for feature in range(features):
        _combine(state, feature, counts[feature], sums[feature], squares[feature])
    return state


@numba.njit(nogil=True, cache=True)
def merge_moments(a, b):
    """The state of the union of the values behind states `a` and `b`: a new float64[F, 3]."""
    if a.shape[1] != 3 or b.shape[1] != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(_SHAPE_ERROR)
    merged = a.copy()
    for feature in range(a.shape[0]):
        _combine(merged, feature, b[feature, 0], b[feature, 1], b[feature, 2])
    return merged


def update_moments_numpy(state, block):
    """NumPy twin of `update_moments`."""
    block = np.asarray(block)
    if state.ndim != 2 or state.shape[1] != 3 or block.ndim != 2 or block.shape[1] != state.shape[0]:
        raise ValueError(_SHAPE_ERROR)
    for feature in range(state.shape[0]):
        column = block[:, feature].astype(np.float64)
        finite = column[np.isfinite(column)]
        if finite.size:
            mean = finite.mean()
            _combine_numpy(state[feature], finite.size, mean, float(np.sum((finite - mean) ** 2)))
    return state


def merge_moments_numpy(a, b):
    """NumPy twin of `merge_moments`."""
    if a.shape[1] != 3 or b.shape[1] != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(_SHAPE_ERROR)
    merged = a.copy()
    for feature in range(a.shape[0]):
        _combine_numpy(merged[feature], *b[feature])
    return merged


def _combine_numpy(row, count, mean, m2):
    if count == 0:
        return
    total = row[COUNT] + count
    delta = mean - row[MEAN]
    row[M2] += m2 + delta * delta * row[COUNT] * count / total
    row[MEAN] += delta * count / total
    row[COUNT] = total


def new_moments(features: int) -> np.ndarray:
    """Empty state for `features` features: float64[F, 3] of zeros."""
    return np.zeros((features, 3), np.float64)


def variance(state, ddof: int = 0) -> np.ndarray:
    """float64[F]: M2 / (count - ddof); NaN where count <= ddof."""
    state = np.asarray(state)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(state[:, COUNT] > ddof, state[:, M2] / (state[:, COUNT] - ddof), np.nan)
