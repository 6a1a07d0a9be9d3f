"""Sequential mode: evidence of a shift accumulated across sub-windows, a two-sided CUSUM of rank scores.

A window test (calibrated mode) looks at one window at a time, so a shift too small to show in one
window is never caught. Here every closed sub-window gives, per feature, one standardized score

    z = (mean of u(x) over the sub-window's rows − E u) / sqrt(Var u / n)

where u(x) is the reference's mid-rank of x (the share of reference values below x's fine bin plus
half of those in it): the probability integral transform on the fine CDF bins. Under no drift u is
distributed as in the reference whatever the feature's distribution (heavy tails, skew, discrete
values: it is a rank statistic, the Mann–Whitney U of the sub-window against the reference), so z
is close to N(0, 1) for sub-windows of hundreds of rows; a location shift moves its mean.

A two-sided CUSUM adds the scores up, S⁺ = max(0, S⁺ + z − k), S⁻ = max(0, S⁻ − z − k), and alarms
when max(S⁺, S⁻) > h. The reference is itself a sample: its error moves the mean of every z by the
same amount, as much as `reference_allowance` in the unluckiest REFERENCE_BAND of references, so k is
0.5 plus that allowance (the drift of S under no shift stays ≤ −0.5). h is set from Siegmund's
approximation of the average run length, ARL(h) = (e^{2μb} − 1 − 2μb) / (2μ²), b = h + 1.166,
μ = 0.5, for the false-alarm budget. S is capped at `CAP` × h: an alarm clears a few sub-windows
after the shift ends instead of as many as it lasted.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from gateway.ext import drift as kernels

NULL_DRIFT = 0.5
"""k − reference allowance: S drifts down by at least this much a sub-window when nothing changed,
and a shift of ~2 × this in z units a sub-window is detected fastest."""

SIEGMUND_CORRECTION = 1.166  # the overshoot correction of Siegmund's ARL approximation (2 × 0.583)

CAP = 1.5
"""S is held at most CAP × h: the alert stays while the shift lasts and clears soon after it ends."""


def reference_allowance(sub_window_rows: float, reference_rows: float, band: float) -> float:
    """How far the reference's own sampling error can move a score's mean (in z units) for all but
    the `band` unluckiest references: z_{band/2} × sqrt(n / N), the reference half of U's variance."""
    if reference_rows <= 0:
        return math.inf
    return NormalDist().inv_cdf(1.0 - band / 2.0) * math.sqrt(sub_window_rows / reference_rows)


def threshold_for(run_length: float, drift: float = NULL_DRIFT) -> float:
    """h such that one side of the CUSUM (increments N(−drift, 1)) alarms after `run_length` steps
    on average: Siegmund's ARL approximation solved by bisection (ARL grows with h)."""
    def arl(h: float) -> float:
        b = 2.0 * drift * (h + SIEGMUND_CORRECTION)
        return (math.expm1(b) - b) / (2.0 * drift * drift)

    low, high = 0.0, 1.0
    while arl(high) < run_length:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        low, high = (middle, high) if arl(middle) < run_length else (low, middle)
    return high


def rank_scores(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature of fine reference counts `int64[F, B+4]`: (u per column, E u, Var u).

    Columns are ordered BELOW, bins 0..B−1, ABOVE by value; NaN and ±inf get no score (their share
    is watched by the window statistics). A constant feature has Var u = 0 and no score.
    """
    bins = reference.shape[1] - kernels.EXTRA_COLUMNS
    ordered = np.concatenate([reference[:, [kernels.BELOW]], reference[:, :bins], reference[:, [kernels.ABOVE]]],
                             axis=1).astype(np.float64)
    total = ordered.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, ordered / total, 0.0)
    below = np.cumsum(share, axis=1) - share
    ordered_scores = below + share / 2.0
    scores = np.zeros(reference.shape, np.float64)
    scores[:, :bins] = ordered_scores[:, 1:-1]
    scores[:, kernels.BELOW] = ordered_scores[:, 0]
    scores[:, kernels.ABOVE] = ordered_scores[:, -1]
    mean = (share * ordered_scores).sum(axis=1)
    variance = (share * (ordered_scores - mean[:, None]) ** 2).sum(axis=1)
    return scores, mean, variance


def sub_window_scores(counts: np.ndarray, scores: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, rows) per feature of one sub-window's fine counts; z is 0 where it has no scored rows or
    the feature was constant in the reference."""
    scored = counts.astype(np.float64)
    scored[:, kernels.NAN] = scored[:, kernels.INF] = 0.0
    rows = scored.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = ((scored * scores).sum(axis=1) / rows - mean) / np.sqrt(variance / rows)
    return np.where((rows > 0) & (variance > 0), z, 0.0), rows


class Cusum:
    """The two one-sided sums of one tensor's features, fed one sub-window at a time."""

    def __init__(self, reference: np.ndarray, band: float) -> None:
        self.scores, self.mean, self.variance = rank_scores(reference)
        self.reference_rows = reference[:, :-2].sum(axis=1).astype(np.float64)
        self.band = band
        self.up = np.zeros(reference.shape[0])
        self.down = np.zeros(reference.shape[0])
        self.latest_z = np.zeros(reference.shape[0])
        self.sub_windows = 0

    def __repr__(self) -> str:
        return f"<Cusum features={len(self.up)} sub_windows={self.sub_windows} max={float(self.statistic().max(initial=0)):.3g}>"

    def add(self, counts: np.ndarray, threshold: float) -> None:
        """Add one closed sub-window's fine counts (S held at most CAP × threshold)."""
        z, rows = sub_window_scores(counts, self.scores, self.mean, self.variance)
        allowance = np.array([reference_allowance(n, reference, self.band)
                              for n, reference in zip(rows, self.reference_rows)])
        k = NULL_DRIFT + allowance
        ceiling = CAP * threshold
        self.up = np.minimum(np.maximum(0.0, self.up + z - k), ceiling)
        self.down = np.minimum(np.maximum(0.0, self.down - z - k), ceiling)
        self.latest_z = z
        self.sub_windows += 1

    def statistic(self) -> np.ndarray:
        """Per feature, max(S⁺, S⁻): the evidence of a shift either way."""
        return np.maximum(self.up, self.down)
