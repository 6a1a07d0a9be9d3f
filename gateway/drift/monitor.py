"""Drift monitors: binned statistics of a model's tensors over sliding windows, against a reference.

    TensorMonitor   one tensor: its features, reference edges and counts, sub-window histograms
    ModelMonitor    one model: its tensor monitors, alert states, reservoir, the latest report

Hot path: `ModelMonitor.observe(request, response)` — one compiled histogram update per watched
tensor per (sampled) request. When a sub-window fills, the window (the last `sub_windows`
sub-windows) is compared with the reference and alerts are updated; that is the cold path.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Callable

import numpy as np

from gateway.drift.alerts import OK, AlertState
from gateway.drift.config import ModelDriftConfig
from gateway.drift.reservoir import Reservoir
from gateway.drift.sequential import Cusum, threshold_for
from gateway.ext import drift as kernels
from gateway.protocol.tensors import NUMPY_DTYPES

_LEVELS = ["ok", "warning", "alert"]

#: calibrated mode: the tests hold for every reference but this share of the unluckiest (ks.py)
REFERENCE_BAND = 1e-3

#: sample_rate is honoured as a fraction with a denominator up to this (rates below 1e-9 count 1e-9).
SAMPLE_RATE_DENOMINATOR = 1_000_000_000

def _histogram_statistics(reference, current, cdf_reference, cdf_current, cdf_edges, reference_tails, current_tails,
                          reference_outer=None, current_outer=None):
    """Every statistic of one tensor's window: PSI, JS and chi² (Evidently's, with its p-value) on the
    bins; KS and Wasserstein-1 on the fine CDF bins (W1's outer regions exact: from the outer values
    where both sides kept them all, else from their sums)."""
    goodness = np.asarray(kernels.chi_square_goodness(reference, current))
    dof = kernels.degrees_of_freedom(kernels.fold_tails(reference), kernels.fold_tails(current))
    if reference_tails is not None and cdf_edges.shape[1] > 2:
        wasserstein = kernels.wasserstein_distance_tails(cdf_reference, cdf_current, cdf_edges, reference_tails, current_tails)
    else:
        wasserstein = kernels.wasserstein_distance(cdf_reference, cdf_current, cdf_edges)
    if reference_outer is not None and current_outer is not None and cdf_edges.shape[1] > 2:
        inner = kernels.wasserstein_inner(cdf_reference, cdf_current, cdf_edges)
        wasserstein = np.array(wasserstein, np.float64)
        for feature, (reference_values, current_values) in enumerate(zip(reference_outer, current_outer)):
            if reference_values is not None and current_values is not None and not math.isnan(inner[feature]):
                wasserstein[feature] = inner[feature] + kernels.outer_regions_exact(
                    reference_values, current_values, float(cdf_reference[feature, :-2].sum()),
                    float(cdf_current[feature, :-2].sum()), float(cdf_edges[feature, 1]), float(cdf_edges[feature, -2]))
    return {
        "psi": np.asarray(kernels.population_stability_index(reference, current)),
        "js": np.asarray(kernels.jensen_shannon_distance(reference, current)),
        "ks": np.asarray(kernels.ks_statistic(cdf_reference, cdf_current)),
        "wasserstein": np.asarray(wasserstein),
        "chi_square": goodness,
        "chi_square_p": _chi2_pvalues(goodness, dof),
    }


def _chi2_pvalues(statistics: np.ndarray, dof: np.ndarray) -> np.ndarray:
    return np.asarray(kernels.chi2_survival_many(np.ascontiguousarray(statistics, np.float64),
                                                 np.ascontiguousarray(dof, np.int64)))


def tensor_block(datatype: str, shape, raw: bytes, features: tuple[int, ...], reduction: str) -> np.ndarray | None:
    """The [rows, F] float block a tensor contributes, or None if it is not numeric.

    `reduction` (mean or l2) summarizes wide tensors per row and channel: a [rows, C, ...] tensor
    (an image, a sequence of embeddings) gives one feature per channel, reduced over the trailing
    dimensions; a [rows, D] tensor (an embedding) gives one feature per row. `features` then picks
    columns of the result.
    """
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None or not shape:
        return None
    rows = shape[0]
    if reduction != "none":
        channels = shape[1] if len(shape) > 2 else 1
        array = np.frombuffer(raw, dtype=dtype).reshape(rows, channels, -1) if rows else np.empty((0, channels, 1))
        if reduction == "mean":
            array = array.mean(axis=2, dtype=np.float64)
        else:
            array = np.sqrt(np.square(array, dtype=np.float64).sum(axis=2))
    else:
        array = np.frombuffer(raw, dtype=dtype).reshape(rows, math.prod(shape[1:]))
    if features:
        array = array[:, list(features)]
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    return np.ascontiguousarray(array)


class TensorMonitor:
    """Histograms of one tensor's features: the reference, and a ring of sub-window histograms."""

    def __init__(self, name: str, kind: str, config: ModelDriftConfig) -> None:
        self.name = name
        self.kind = kind  # "input" or "output"
        self.config = config
        self.features = config.features.get(name, ())
        self.reduction = config.reduction.get(name, "none")
        self.sub_window_rows = max(1, config.window_rows // config.sub_windows)
        # The bins of PSI, JS and chi² (`edges`, `reference`: runs of `refine` fine bins) and the fine
        # CDF bins of KS and W1 (`cdf_edges`, `cdf_reference`, `reference_tails`), counted once.
        self.edges: np.ndarray | None = None
        self.reference: np.ndarray | None = None
        self.refine = 1
        self.cdf_edges: np.ndarray | None = None
        self.cdf_reference: np.ndarray | None = None
        self.reference_tails: np.ndarray | None = None  # None: a profile without them (W1 binned)
        self.reference_outer: list[np.ndarray] | None = None  # per feature, every value outside [e_1, e_B-1)
        self._window_sums: tuple | None = None  # (ring length, newest sub-window, counts, tails) of cdf_window
        self._reference_moments: tuple | None = None  # (cdf_reference, mean, sd) of effect_sizes
        self._index = None
        self._learning: list[np.ndarray] = []
        self._learned_rows = 0
        self._ring: list[np.ndarray] = []
        self._ring_tails: list[np.ndarray | None] = []
        self._ring_outer: list[np.ndarray | None] = []
        self._current_outer: np.ndarray | None = None
        self._current: np.ndarray | None = None
        self._current_tails: np.ndarray | None = None
        self._current_rows = 0
        self._current_started = time.monotonic()
        self._current_wall = time.time()
        self._ring_started: list[float] = []
        # Counts of every closed sub-window since the reference was set: cumulative, so metrics
        # collectors can take increases over any range and add them up across gateway replicas.
        self.observed: np.ndarray | None = None
        self.observed_since_ns = 0
        self.window_started: float | None = None  # wall time the oldest sub-window of the window began
        # sequential mode: closed sub-windows not yet added to the CUSUM, and the CUSUM itself
        self._unscored: list[np.ndarray] = []
        self.cusum: Cusum | None = None

    def __repr__(self) -> str:
        state = "learning" if self.reference is None else f"{len(self._ring)} sub-windows"
        return f"<TensorMonitor {self.kind} {self.name} {state} rows={self._current_rows}>"

    def observed_buckets(self) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
        """Per feature, (upper bounds, counts) of `observed` as a histogram with open-ended outer
        buckets: finite values below the first edge, each bin, values above the last edge. NaN and
        ±inf are not in it. (Bins here are [e_i, e_i+1); a histogram's bucket is (b_i-1, b_i]: a
        value exactly on an edge lands one bucket apart, which does not matter for drift.)"""
        observed, edges = self.observed, self.edges
        if observed is None or edges is None:
            return []
        observed = observed.copy()  # read from an exporter thread while the loop may add to it
        bins = observed.shape[1] - kernels.EXTRA_COLUMNS
        return [
            (tuple(map(float, edges[feature])),
             (int(row[kernels.BELOW]), *map(int, row[:bins]), int(row[kernels.ABOVE])))
            for feature, row in enumerate(observed)
        ]

    def _start_counting(self) -> None:
        """A new reference: fresh sub-window, empty ring, cumulative counts from zero."""
        self._ring.clear()
        self._ring_tails.clear()
        self._ring_outer.clear()
        self._ring_started.clear()
        self._unscored.clear()
        self.cusum = None
        self._current = self._fresh()
        self._current_tails = self._fresh_tails()
        self._current_outer = self._fresh_outer()
        self._current_rows = 0
        self.observed = self._coarse(self._fresh())
        self.observed_since_ns = time.time_ns()

    def set_reference(self, data: np.ndarray) -> None:
        """Fine CDF edges from the reference's quantiles (every bin starts with mass), its counts and tails."""
        data = np.ascontiguousarray(data, dtype=np.float64).reshape(len(data), -1)
        refine = self.config.cdf_refine
        edges = kernels.quantile_edges(data, self.config.bins * refine)
        tails = np.zeros((edges.shape[0], 2))
        self._index = kernels.cell_index(edges)
        counts = kernels.update_cdf(kernels.new_histogram(edges), tails, np.zeros((edges.shape[0], 0)), edges,
                                    *self._index, data)
        outer = [column[np.isfinite(column) & ((column < edges[f, 1]) | (column >= edges[f, -2]))]
                 for f, column in enumerate(data.T)]
        self._set_fine(edges, counts, tails, refine, outer)

    def _set_fine(self, cdf_edges: np.ndarray, cdf_counts: np.ndarray, tails: np.ndarray | None, refine: int,
                  outer: list | None = None) -> None:
        self.cdf_edges, self.cdf_reference, self.reference_tails, self.refine = cdf_edges, cdf_counts, tails, refine
        self.reference_outer = None if outer is None or any(v is None for v in outer) else [
            np.asarray(v, np.float64) for v in outer]
        self.edges = np.ascontiguousarray(cdf_edges[:, ::refine])
        self.reference = kernels.coarsen(cdf_counts, refine)
        if self._index is None:
            self._index = kernels.cell_index(cdf_edges)
        self._start_counting()

    def set_reference_counts(self, edges: np.ndarray, counts: np.ndarray, cdf: dict | None = None) -> None:
        """A reference from counts: the bins only (KS and W1 then on the bins too), or with `cdf`
        ({"edges", "counts", "tails"} of fine bins whose runs of `refine` are the bins)."""
        if cdf is not None:
            cdf_edges = np.ascontiguousarray(cdf["edges"], dtype=np.float64)
            refine = (cdf_edges.shape[1] - 1) // (np.shape(edges)[1] - 1)
            self._index = kernels.cell_index(cdf_edges)
            tails = np.ascontiguousarray(cdf["tails"], dtype=np.float64) if cdf.get("tails") is not None else None
            self._set_fine(cdf_edges, np.ascontiguousarray(cdf["counts"], dtype=np.int64), tails, refine, cdf.get("outer"))
            return
        edges = np.ascontiguousarray(edges, dtype=np.float64)
        self._index = kernels.cell_index(edges)
        self._set_fine(edges, np.ascontiguousarray(counts, dtype=np.int64), None, 1)

    def forget_reference(self) -> None:
        """Learn the reference again from the next rows."""
        self.edges = self.reference = self._current = self.observed = None
        self.cdf_edges = self.cdf_reference = self.reference_tails = self._current_tails = self._index = None
        self.reference_outer = self._current_outer = None
        self._ring.clear()
        self._ring_tails.clear()
        self._ring_outer.clear()
        self._ring_started.clear()
        self._unscored.clear()
        self.cusum = None
        self._learning.clear()
        self._learned_rows = 0
        self._current_rows = 0
        self.window_started = None

    def update(self, block: np.ndarray) -> bool:
        """Count a [rows, F] block; True when a sub-window closed and a full window is ready.

        The block is cut where the reference is complete (exactly `learn_rows` rows) and where a
        sub-window is full (exactly `sub_window_rows`), so the windows are the same whether rows
        come one request at a time or many requests at once (DriftStage counts up to 20 ms of them).
        """
        ready = False
        while len(block):
            if self.reference is None:
                needed = self.config.reference.learn_rows - self._learned_rows
                part, block = block[:needed], block[needed:]
                self._learning.append(np.array(part, dtype=np.float64))
                self._learned_rows += len(part)
                if self._learned_rows >= self.config.reference.learn_rows:
                    self.set_reference(np.concatenate(self._learning))
                    self._learning.clear()
                continue
            room = self.sub_window_rows - self._current_rows
            if 0 < room < len(block):
                part, block = block[:room], block[room:]
            else:
                part, block = block, block[:0]
            kernels.update_cdf(self._current, self._current_tails, self._current_outer, self.cdf_edges, *self._index,
                               np.ascontiguousarray(part))
            ready |= self._count_rows(len(part))
        return ready

    def _fresh_tails(self) -> np.ndarray | None:
        return np.zeros((self.cdf_edges.shape[0], 2))

    def _fresh_outer(self) -> np.ndarray | None:
        """Room for the outer values of one sub-window: 8× the 2 n / B a quiet one has, at least 64."""
        bins = self.cdf_edges.shape[1] - 1
        return np.zeros((self.cdf_edges.shape[0], max(64, 16 * self.sub_window_rows // bins)))

    def _coarse(self, counts: np.ndarray) -> np.ndarray:
        return kernels.coarsen(counts, self.refine)

    def _fresh(self) -> np.ndarray:
        return kernels.new_histogram(self.cdf_edges)

    def _count_rows(self, rows: int) -> bool:
        """Account `rows` just counted; close the sub-window when it is full (or timed out)."""
        self._current_rows += rows
        timed_out = (
            self.config.window_seconds is not None
            and time.monotonic() - self._current_started >= self.config.window_seconds / self.config.sub_windows
        )
        if self._current_rows < self.sub_window_rows and not (timed_out and self._current_rows):
            return False
        self._ring.append(self._current)
        if self.config.mode == "sequential":
            self._unscored.append(self._current)
        self._ring_tails.append(self._current_tails)
        self._ring_outer.append(self._outer_parts(self._current, self._current_outer))
        self._ring_started.append(self._current_wall)
        self.observed += self._coarse(self._current)
        if len(self._ring) > self.config.sub_windows:
            self._ring.pop(0)
            self._ring_tails.pop(0)
            self._ring_outer.pop(0)
            self._ring_started.pop(0)
        self.window_started = self._ring_started[0]
        self._current = self._fresh()
        self._current_tails = self._fresh_tails()
        self._current_outer = self._fresh_outer()
        self._current_rows = 0
        self._current_started = time.monotonic()
        self._current_wall = time.time()
        return self.has_full_window

    @property
    def has_window(self) -> bool:
        """At least one sub-window has closed since the reference was set."""
        return bool(self._ring)

    @property
    def has_full_window(self) -> bool:
        """A whole window (`sub_windows` sub-windows) has closed: statistics mean what they say."""
        return len(self._ring) == self.config.sub_windows

    def window(self) -> np.ndarray:
        """Counts of the sub-windows closed so far (up to a whole window), on the bins."""
        return self._coarse(np.sum(self._ring, axis=0))

    def cdf_window(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Fine CDF counts and tail sums of the sub-windows closed so far (summed once per ring change)."""
        if self._window_sums is None or self._window_sums[0] != len(self._ring_started) or self._window_sums[1] is not self._ring[-1]:
            self._window_sums = (len(self._ring_started), self._ring[-1],
                                 np.sum(self._ring, axis=0), np.sum(self._ring_tails, axis=0))
        return self._window_sums[2], self._window_sums[3]

    def _outer_parts(self, counts: np.ndarray, kept: np.ndarray | None) -> list[np.ndarray | None] | None:
        """A closed sub-window's outer values per feature (None where it saw more than it kept)."""
        if kept is None:
            return None
        bins = self.cdf_edges.shape[1] - 1
        seen = counts[:, [0, bins - 1, bins, bins + 1]].sum(axis=1)
        return [kept[feature, :seen[feature]].copy() if seen[feature] <= kept.shape[1] else None
                for feature in range(counts.shape[0])]

    def window_outer(self) -> list[np.ndarray | None]:
        """Per feature, the window's values outside [e_1, e_B-1), or None where a sub-window had more
        than it keeps (then W1 takes the outer regions from their sums)."""
        result = []
        for feature in range(self.cdf_edges.shape[0]):
            parts = [sub_window[feature] for sub_window in self._ring_outer]
            result.append(None if any(part is None for part in parts) else np.concatenate(parts))
        return result

    def statistics(self) -> dict[str, np.ndarray]:
        cdf_current, current_tails = self.cdf_window()
        return _histogram_statistics(self.reference, self._coarse(cdf_current), self.cdf_reference, cdf_current,
                                     self.cdf_edges, self.reference_tails, current_tails,
                                     self.reference_outer, self.window_outer() if self.reference_outer is not None else None)

    def tests(self) -> dict[str, np.ndarray]:
        """Per-feature p-values of the calibrated mode: KS on the fine bins, against this reference
        (`ks_pvalue_given_reference`: the reference's own error band taken out, at REFERENCE_BAND)."""
        cdf_current, _ = self.cdf_window()
        ks = kernels.ks_statistic(self.cdf_reference, cdf_current)
        reference_rows = self.cdf_reference[:, :-2].sum(axis=1)
        current_rows = cdf_current[:, :-2].sum(axis=1)
        return {"ks": np.array([kernels.ks_pvalue_given_reference(float(d), float(n), float(m), REFERENCE_BAND)
                                for d, n, m in zip(ks, reference_rows, current_rows)])}

    def sequential_evidence(self, threshold: float) -> np.ndarray | None:
        """sequential mode: add the sub-windows closed since the last call to the CUSUM (sequential.py);
        per feature, its statistic max(S⁺, S⁻), compared with `threshold` by the model."""
        if self.cusum is None:
            self.cusum = Cusum(self.cdf_reference, REFERENCE_BAND)
        for counts in self._unscored:
            self.cusum.add(counts, threshold)
        self._unscored.clear()
        return self.cusum.statistic()

    def effect_sizes(self) -> np.ndarray:
        """Per feature, the window's mean minus the reference's, in reference standard deviations,
        from the fine bins (each bin's values at its midpoint; the outer regions at their exact means
        where tail sums are known)."""
        cdf_current, current_tails = self.cdf_window()
        if self._reference_moments is None or self._reference_moments[0] is not self.cdf_reference:
            self._reference_moments = (self.cdf_reference,
                                       *_binned_moments(self.cdf_reference, self.cdf_edges, self.reference_tails))
        _, reference_mean, reference_sd = self._reference_moments
        current_mean, _ = _binned_moments(cdf_current, self.cdf_edges, current_tails if self.reference_tails is not None else None)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (current_mean - reference_mean) / reference_sd


def _binned_moments(counts: np.ndarray, edges: np.ndarray, tails: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation) per feature of a fine histogram: bin midpoints, exact outer means from tails."""
    bins = edges.shape[1] - 1
    inside = counts[:, :bins].astype(np.float64)
    points = (edges[:, :-1] + edges[:, 1:]) / 2.0
    below, above = counts[:, kernels.BELOW].astype(np.float64), counts[:, kernels.ABOVE].astype(np.float64)
    total = inside.sum(axis=1) + below + above
    weights = inside.copy()
    if tails is not None and bins > 1:
        left, right = inside[:, 0] + below, inside[:, -1] + above
        with np.errstate(divide="ignore", invalid="ignore"):
            points[:, 0] = np.where(left > 0, tails[:, 0] / left, points[:, 0])
            points[:, -1] = np.where(right > 0, tails[:, 1] / right, points[:, -1])
        weights[:, 0], weights[:, -1] = left, right
    else:
        weights[:, 0] += below
        weights[:, -1] += above
        points[:, 0] = np.where(below > 0, (points[:, 0] * inside[:, 0] + edges[:, 0] * below) / np.maximum(weights[:, 0], 1), points[:, 0])
        points[:, -1] = np.where(above > 0, (points[:, -1] * inside[:, -1] + edges[:, -1] * above) / np.maximum(weights[:, -1], 1), points[:, -1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ±1e300 values: an inf variance
        mean = (weights * points).sum(axis=1) / total
        variance = (weights * (points - mean[:, None]) ** 2).sum(axis=1) / total
    return mean, np.sqrt(variance)


CATEGORICAL_STATISTICS: dict[str, Callable] = {
    "psi": lambda ref, cur: kernels.psi_table(ref, cur),
    "js": lambda ref, cur: kernels.jensen_shannon_table(ref, cur),
    "chi_square": lambda ref, cur: kernels.chi_square_goodness_table(ref, cur),
}


class CategoricalMonitor(TensorMonitor):
    """A BYTES (categorical) tensor: hashed frequency buckets per feature instead of value bins.

    The reference is the bucket counts of the first learn_rows rows (or a profile); ks and
    wasserstein have no meaning for categories and are not computed.
    """

    def __init__(self, name: str, kind: str, config: ModelDriftConfig) -> None:
        super().__init__(name, kind, config)
        self._learned: np.ndarray | None = None

    def _new_counts(self, features: int) -> np.ndarray:
        return np.zeros((features, self.config.buckets), dtype=np.int64)

    def forget_reference(self) -> None:
        super().forget_reference()
        self._learned = None

    def update_raw(self, raw: bytes, features: int) -> bool:
        """Count one request's raw BYTES elements ([rows, features] row-major)."""
        elements = kernels.as_raw(raw)
        if self.reference is None:
            if self._learned is None:
                self._learned = self._new_counts(features)
            kernels.update_bytes_buckets(self._learned, elements)
            self._learned_rows = int(self._learned.sum()) // features
            if self._learned_rows >= self.config.reference.learn_rows:
                self.set_reference_counts(np.zeros((features, 0)), self._learned)
                self._learned = None
            return False
        before = int(self._current.sum())
        kernels.update_bytes_buckets(self._current, elements)
        return self._count_rows((int(self._current.sum()) - before) // features)

    def set_reference_counts(self, edges: np.ndarray, counts: np.ndarray, cdf: dict | None = None) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.reference = np.ascontiguousarray(counts, dtype=np.int64)
        self._start_counting()

    def _fresh(self) -> np.ndarray:
        return self._new_counts(self.reference.shape[0])

    def _fresh_tails(self) -> None:
        return None

    def _fresh_outer(self) -> None:
        return None

    def _coarse(self, counts: np.ndarray) -> np.ndarray:
        return counts

    def cdf_window(self) -> tuple[np.ndarray, None]:
        return np.sum(self._ring, axis=0), None

    def statistics(self) -> dict[str, np.ndarray]:
        current = self.window()
        values = {name: np.asarray(fn(self.reference, current)) for name, fn in CATEGORICAL_STATISTICS.items()}
        values["chi_square_p"] = _chi2_pvalues(values["chi_square"], kernels.degrees_of_freedom(self.reference, current))
        return values

    def tests(self) -> dict[str, np.ndarray]:
        """Per-feature p-value of chi² of homogeneity on the buckets (the calibrated mode's test)."""
        current = self.window()
        homogeneity = np.asarray(kernels.chi_square_table(self.reference, current))
        return {"chi_square": _chi2_pvalues(homogeneity, kernels.degrees_of_freedom(self.reference, current))}

    def effect_sizes(self) -> np.ndarray:
        return np.full(self.reference.shape[0], np.nan)  # categories have no mean

    def sequential_evidence(self, threshold: float) -> None:
        return None  # categories have no order to rank: their chi² window test watches them

    def observed_buckets(self) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
        """Per feature, the hashed category buckets as histogram buckets: bucket k below bound k."""
        observed = self.observed
        if observed is None:
            return []
        observed = observed.copy()
        bounds = tuple(float(k) for k in range(observed.shape[1] - 1))
        return [(bounds, tuple(map(int, row))) for row in observed]


def _add(groups: dict, kind: str, tensor, raw: bytes) -> None:
    """Put one tensor's raw contents with those of the same kind, name, datatype and trailing shape."""
    shape = tensor.shape
    if not shape:  # a scalar has no rows to count (tensor_block skips it too)
        return
    key = (kind, tensor.name, tensor.datatype, tuple(shape[1:]))
    group = groups.get(key)
    if group is None:
        groups[key] = [shape[0], [raw]]
    else:
        group[0] += shape[0]
        group[1].append(raw)


class ModelMonitor:
    """All drift state of one model; `observe` is called once per finished request."""

    def __init__(self, model: str, config: ModelDriftConfig, on_alert: Callable[[dict], None], reservoir_rows: int) -> None:
        self.model = model
        self.config = config
        self.on_alert = on_alert
        self.tensors: dict[tuple[str, str], TensorMonitor] = {}
        self.alert_states: dict[tuple[str, int, str], AlertState] = {}
        self.reservoir = Reservoir(reservoir_rows)
        self.windows_evaluated = 0
        self.alerts_fired = 0
        self.last_report: dict | None = None
        # Exactly `sample_rate` of the requests, evenly spread: each request adds the rate's
        # numerator to a credit, and one is counted whenever the credit reaches the denominator
        # (integers, so 0.3 counts 3 requests of every 10, never 1 of 3 or 1 of 4).
        rate = max(Fraction(config.sample_rate).limit_denominator(SAMPLE_RATE_DENOMINATOR),
                   Fraction(1, SAMPLE_RATE_DENOMINATOR))
        self._sample_step, self._sample_period = rate.numerator, rate.denominator
        self._sample_credit = 0
        self.counts_whole_batches = rate == 1
        """Whether a merged batch may be counted as one (`sample`'s `batches`): when every request is
        counted (`sample_rate` 1, the default), counting the batch the batching stage sent counts
        exactly its requests' rows, with one lookup per batch instead of one per request."""
        self.sampled = 0  # requests counted
        self._watch_inputs = set(config.inputs) if (config.inputs or config.outputs) else None
        self._watch_outputs = set(config.outputs)
        self._cusum_threshold: tuple[float, float] | None = None  # (run length, h) of cusum_threshold

    def __repr__(self) -> str:
        return (f"<ModelMonitor {self.model} tensors={len(self.tensors)} sampled={self.sampled} "
                f"windows={self.windows_evaluated} alerts={self.alerts_fired}>")

    def tensor(self, name: str, kind: str, monitor_type: type = TensorMonitor) -> TensorMonitor:
        """The monitor of a tensor, made on first sight (numeric, or CategoricalMonitor for BYTES)."""
        key = (kind, name)
        monitor = self.tensors.get(key)
        if monitor is None:
            monitor = monitor_type(name, kind, self.config)
            self.tensors[key] = monitor
        return monitor

    def observe(self, request, response) -> None:
        """Count one finished request's watched tensors (sampled at `sample_rate`)."""
        self.observe_many(((request, response),))

    def observe_many(self, finished) -> None:
        """Count the watched tensors of finished requests and merged batches, in the order they
        were answered: `(request, response)` for a request, `(batch request, batch response,
        requests in it)` for a merged batch.

        Each request is sampled on its own (`sample_rate`); a batch is counted whole (the stage hands
        over batches only when `counts_whole_batches`). The sampled tensors of one name, datatype and
        trailing shape are joined and counted with one compiled update, so the gateway's cost per
        request is a few list appends (DriftStage calls this with what finished in the last
        ≤ 20 ms). The order matters where the rows cross a boundary (the reference's last row, a
        sub-window's). A sub-window that fills is evaluated after the whole call.
        """
        groups = self.sample(finished)
        if groups:
            self.count(groups)

    def sample(self, finished) -> dict[tuple, list]:
        """The sampled requests' watched tensors, joined in order: {(kind, name, datatype, trailing
        shape): [rows, [raw parts]]} (empty when none was sampled). What `count` takes, here or in
        the process that merges several workers' windows (gateway/workers/). `finished`: as
        `observe_many` takes it; merged batches are counted whole (see `counts_whole_batches`)."""
        step, period = self._sample_step, self._sample_period
        credit = self._sample_credit
        kept, sampled = [], 0
        for item in finished:
            if len(item) == 3:  # a merged batch, counted whole
                kept.append(item)
                sampled += item[2]
                continue
            credit += step
            if credit >= period:
                credit -= period
                kept.append(item)
                sampled += 1
        self._sample_credit = credit
        groups: dict[tuple, list] = {}  # (kind, name, datatype, trailing shape) -> [rows, raw parts]
        if kept:
            self.sampled += sampled
            self._gather(kept, groups)
        return groups

    def _gather(self, pairs, groups: dict[tuple, list]) -> None:
        """Add the watched tensors of (request, response, …) `pairs` to `groups` (see `sample`)."""
        watch_inputs, watch_outputs = self._watch_inputs, self._watch_outputs
        for request, response, *_ in pairs:
            raw_inputs = request.raw_input_contents
            if raw_inputs:  # typed contents are converted to raw only on the batching path
                for index, tensor in enumerate(request.inputs):
                    if watch_inputs is None or tensor.name in watch_inputs:
                        _add(groups, "input", tensor, raw_inputs[index])
            if response is not None and watch_outputs:
                raw_outputs = response.raw_output_contents
                for index, tensor in enumerate(response.outputs):
                    if tensor.name in watch_outputs and index < len(raw_outputs):
                        _add(groups, "output", tensor, raw_outputs[index])

    def count(self, groups: dict[tuple, list]) -> None:
        """Count sampled tensors (`sample`'s groups) into the windows; evaluate a window that filled."""
        closed = False
        sample: dict[str, np.ndarray] = {}
        for (kind, name, datatype, trailing), (rows, parts) in groups.items():
            raw = parts[0] if len(parts) == 1 else b"".join(parts)
            if datatype == "BYTES":
                if kind == "input":
                    closed |= self.tensor(name, kind, CategoricalMonitor).update_raw(raw, math.prod(trailing) if trailing else 1)
                continue
            block = tensor_block(datatype, (rows, *trailing), raw, *self._shape_of(name))
            if block is not None:
                closed |= self.tensor(name, kind).update(block)
                sample[f"{kind}/{name}"] = block
        if sample and len({len(v) for v in sample.values()}) == 1:
            self.reservoir.offer(sample)
        if closed:
            self.evaluate()

    def _shape_of(self, name: str) -> tuple[tuple[int, ...], str]:
        return self.config.features.get(name, ()), self.config.reduction.get(name, "none")

    @property
    def alpha(self) -> float:
        """The window tests' level per evaluation: a window is evaluated sub_windows times. The
        sequential mode gives half of the false-alarm budget to them and half to the CUSUM."""
        share = 0.5 if self.config.mode == "sequential" else 1.0
        return share / (self.config.false_alarms_per_windows * self.config.sub_windows)

    def cusum_threshold(self, features: int) -> float:
        """sequential mode: h for the CUSUM's half of the budget over `features` numeric features
        (each with two sides, each sub-window a step): the average run length to a false alarm of one
        side is 2 × 2 × features × sub_windows × false_alarms_per_windows sub-windows."""
        run_length = 4.0 * max(features, 1) * self.config.sub_windows * self.config.false_alarms_per_windows
        if self._cusum_threshold is None or self._cusum_threshold[0] != run_length:
            self._cusum_threshold = (run_length, threshold_for(run_length))
        return self._cusum_threshold[1]

    def evaluate(self) -> dict:
        """Compare every full window with its reference, update alert states, and report."""
        features: list[dict] = []
        now = time.time()
        calibrated = self.config.mode in ("calibrated", "sequential")
        threshold = None
        if self.config.mode == "sequential":
            threshold = self.cusum_threshold(sum(monitor.reference.shape[0] for monitor in self.tensors.values()
                                                 if monitor.reference is not None
                                                 and not isinstance(monitor, CategoricalMonitor)))
        for (kind, name), monitor in self.tensors.items():
            if monitor.reference is None or not monitor.has_full_window:
                continue
            stats = monitor.statistics()
            tests = monitor.tests() if calibrated else {}
            effects = monitor.effect_sizes()
            evidence = monitor.sequential_evidence(threshold) if threshold is not None else None
            for feature in range(monitor.reference.shape[0]):
                item = {
                    "tensor": f"{kind}/{name}", "feature": self.feature_label(monitor, feature), "index": feature,
                    "monitor": monitor, "statistics": {stat: float(array[feature]) for stat, array in stats.items()},
                    "p_values": {test: float(array[feature]) for test, array in tests.items()},
                    "effect_size": float(effects[feature]), "since": monitor.window_started, "level": OK,
                }
                if evidence is not None:
                    item["statistics"]["cusum"] = float(evidence[feature])
                features.append(item)
        if calibrated:
            self._judge_calibrated(features, now, threshold)
        else:
            self._judge_thresholds(features, now)
        for feature in features:
            del feature["monitor"], feature["index"]
        self.windows_evaluated += 1
        self.last_report = {
            "model": self.model, "time": now, "window_rows": self.config.window_rows,
            "windows_evaluated": self.windows_evaluated, "mode": self.config.mode,
            "alpha": self.alpha if calibrated else None, "cusum_threshold": threshold, "features": features,
        }
        return self.last_report

    def _judge_thresholds(self, features: list[dict], now: float) -> None:
        for item in features:
            values, level = item["statistics"], OK
            for stat, (warning, alert) in self.config.thresholds.items():
                if stat not in values:  # e.g. ks or wasserstein of a categorical tensor
                    continue
                state = self._state((item["tensor"], item["index"], stat), warning, alert, self.config.consecutive)
                changed = state.observe(values[stat])
                if changed is not None:
                    self._fire(item, stat, values[stat], changed, now, thresholds=list(self.config.thresholds[stat]))
                level = max(level, state.level, key=_LEVELS.index)
            item["level"] = level

    def _judge_calibrated(self, features: list[dict], now: float, threshold: float | None) -> None:
        """Holm's step-down over every test of every feature at level alpha: the chance that any
        test of a quiet window rejects is at most alpha, so false alerts stay within the budget. In
        sequential mode a feature also alerts when its CUSUM passes `threshold` (the other half)."""
        tests = [(p, position, name) for position, item in enumerate(features)
                 for name, p in item["p_values"].items() if not math.isnan(p)]
        rejected: dict[int, tuple[str, float]] = {}
        for rank, (p, position, name) in enumerate(sorted(tests)):
            if p > self.alpha / (len(tests) - rank):
                break
            rejected.setdefault(position, (name, p))  # the smallest p-value of the feature
        if threshold is not None:
            for position, item in enumerate(features):
                if item["statistics"].get("cusum", 0.0) > threshold:
                    rejected.setdefault(position, ("cusum", math.nan))
        for position, item in enumerate(features):
            state = self._state((item["tensor"], item["index"], "calibrated"), 0.5, 0.5, 1)
            test, p = rejected.get(position, (None, math.nan))
            changed = state.observe(1.0 if position in rejected else 0.0)
            if changed is not None:
                if test is None:  # cleared: report the feature's smallest p-value
                    test, p = min(((name, value) for name, value in item["p_values"].items()),
                                  key=lambda pair: pair[1], default=("ks", math.nan))
                why = {"p_value": p, "alpha": self.alpha, "tests": len(tests)}
                if threshold is not None:
                    why["cusum_threshold"] = threshold
                self._fire(item, test, item["statistics"].get(test, math.nan), changed, now, **why)
            item["level"] = state.level

    def _state(self, key: tuple, warning: float, alert: float, consecutive: int) -> AlertState:
        state = self.alert_states.get(key)
        if state is None:
            state = AlertState(warning, alert, consecutive, self.config.clear_after)
            self.alert_states[key] = state
        return state

    @staticmethod
    def feature_label(monitor: TensorMonitor, feature: int) -> int:
        """The feature's name in reports and metrics: its column in the tensor when features were picked."""
        return monitor.features[feature] if monitor.features else feature

    def load_profile(self, profile: dict) -> int:
        """Set references from a saved profile ({"input/NAME": {"edges": ..., "reference": ...}});
        returns how many tensors it set. Raises KeyError, ValueError or TypeError on a malformed one."""
        for key, entry in profile.items():
            kind, _, name = key.partition("/")
            cdf = entry.get("cdf")
            if cdf is not None:
                cdf = {"edges": cdf["edges"], "counts": cdf["reference"], "tails": cdf.get("reference_tails"),
                       "outer": cdf.get("reference_outer")}
            self.tensor(name, kind).set_reference_counts(np.array(entry["edges"]), np.array(entry["reference"]), cdf)
        return len(profile)

    def reference_from_current_window(self) -> int:
        """Take each tensor's current window as its new reference; returns how many tensors had one."""
        changed = 0
        for tensor in self.tensors.values():
            if tensor.reference is not None and tensor.has_window:
                counts, tails = tensor.cdf_window()
                cdf = None if tails is None else {"edges": tensor.cdf_edges, "counts": counts,
                                                  "tails": tails if tensor.reference_tails is not None else None,
                                                  "outer": tensor.window_outer()}
                tensor.set_reference_counts(tensor.edges, tensor.window(), cdf)
                changed += 1
        return changed

    def forget_references(self) -> None:
        """Learn every reference again from the next rows."""
        for tensor in self.tensors.values():
            tensor.forget_reference()

    def _fire(self, item: dict, statistic: str, value: float, level: str, now: float, **why) -> None:
        """An alert payload: which feature, which statistic and mode, how far, since when."""
        if level != OK:
            self.alerts_fired += 1
        self.on_alert({
            "model": self.model, "tensor": item["tensor"], "feature": item["feature"], "statistic": statistic,
            "value": value, "level": level, "mode": self.config.mode, **why, "time": now,
            "statistics": item["statistics"], "p_values": item["p_values"], "effect_size": item["effect_size"],
            "since": item["since"],
        })

    def histograms(self) -> dict[str, dict]:
        """Reference and current window counts per tensor (for reports, plots and merging)."""
        out = {}
        for (kind, name), monitor in self.tensors.items():
            if monitor.reference is None:
                continue
            entry = out[f"{kind}/{name}"] = {
                "categorical": isinstance(monitor, CategoricalMonitor),
                "edges": monitor.edges.tolist(), "reference": monitor.reference.tolist(),
                "current": monitor.window().tolist() if monitor.has_window else None,
            }
            if not entry["categorical"]:
                cdf_current, current_tails = monitor.cdf_window() if monitor.has_window else (None, None)
                entry["cdf"] = {
                    "edges": monitor.cdf_edges.tolist(), "reference": monitor.cdf_reference.tolist(),
                    "reference_tails": None if monitor.reference_tails is None else monitor.reference_tails.tolist(),
                    "reference_outer": None if monitor.reference_outer is None else [v.tolist() for v in monitor.reference_outer],
                    "current": None if cdf_current is None else cdf_current.tolist(),
                    "current_tails": None if current_tails is None else current_tails.tolist(),
                    "current_outer": None if not monitor.has_window else [
                        None if v is None else v.tolist() for v in monitor.window_outer()],
                }
        return out
