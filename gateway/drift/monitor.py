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
from gateway.ext import drift as kernels
from gateway.protocol.tensors import NUMPY_DTYPES

#: sample_rate is honoured as a fraction with a denominator up to this (rates below 1e-9 count 1e-9).
SAMPLE_RATE_DENOMINATOR = 1_000_000_000

STATISTIC_KERNELS: dict[str, Callable] = {
    "psi": lambda ref, cur, edges: kernels.population_stability_index(ref, cur),
    "js": lambda ref, cur, edges: kernels.jensen_shannon_distance(ref, cur),
    "ks": lambda ref, cur, edges: kernels.ks_statistic(ref, cur),
    "wasserstein": lambda ref, cur, edges: kernels.wasserstein_distance(ref, cur, edges),
    "chi_square": lambda ref, cur, edges: kernels.chi_square_statistic(ref, cur),
}


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
        self.edges: np.ndarray | None = None
        self.reference: np.ndarray | None = None
        self._learning: list[np.ndarray] = []
        self._learned_rows = 0
        self._ring: list[np.ndarray] = []
        self._current: np.ndarray | None = None
        self._current_rows = 0
        self._current_started = time.monotonic()
        # Counts of every closed sub-window since the reference was set: cumulative, so metrics
        # collectors can take increases over any range and add them up across gateway replicas.
        self.observed: np.ndarray | None = None
        self.observed_since_ns = 0

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
        self._current = self._fresh()
        self._current_rows = 0
        self.observed = self._fresh()
        self.observed_since_ns = time.time_ns()

    def set_reference(self, data: np.ndarray) -> None:
        """Bin edges from the reference's quantiles (every bin starts with mass), and its counts."""
        data = np.ascontiguousarray(data, dtype=np.float64).reshape(len(data), -1)
        self.edges = kernels.quantile_edges(data, self.config.bins)
        self.reference = kernels.update_histogram(kernels.new_histogram(self.edges), self.edges, data)
        self._start_counting()

    def set_reference_counts(self, edges: np.ndarray, counts: np.ndarray) -> None:
        self.edges = np.ascontiguousarray(edges, dtype=np.float64)
        self.reference = np.ascontiguousarray(counts, dtype=np.int64)
        self._start_counting()

    def forget_reference(self) -> None:
        """Learn the reference again from the next rows."""
        self.edges = self.reference = self._current = self.observed = None
        self._ring.clear()
        self._learning.clear()
        self._learned_rows = 0
        self._current_rows = 0

    def update(self, block: np.ndarray) -> bool:
        """Count a [rows, F] block; True when a sub-window just closed and a full window is ready."""
        if self.reference is None:
            self._learning.append(np.array(block, dtype=np.float64))
            self._learned_rows += len(block)
            if self._learned_rows >= self.config.reference.learn_rows:
                self.set_reference(np.concatenate(self._learning))
                self._learning.clear()
            return False
        kernels.update_histogram(self._current, self.edges, block)
        return self._count_rows(len(block))

    def _fresh(self) -> np.ndarray:
        return kernels.new_histogram(self.edges)

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
        self.observed += self._current
        if len(self._ring) > self.config.sub_windows:
            self._ring.pop(0)
        self._current = self._fresh()
        self._current_rows = 0
        self._current_started = time.monotonic()
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
        """Counts of the sub-windows closed so far (up to a whole window)."""
        return np.sum(self._ring, axis=0)

    def statistics(self) -> dict[str, np.ndarray]:
        current = self.window()
        return {name: np.asarray(fn(self.reference, current, self.edges)) for name, fn in STATISTIC_KERNELS.items()}


CATEGORICAL_STATISTICS: dict[str, Callable] = {
    "psi": lambda ref, cur: kernels.psi_table(ref, cur),
    "js": lambda ref, cur: kernels.jensen_shannon_table(ref, cur),
    "chi_square": lambda ref, cur: kernels.chi_square_table(ref, cur),
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

    def set_reference_counts(self, edges: np.ndarray, counts: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.reference = np.ascontiguousarray(counts, dtype=np.int64)
        self._start_counting()

    def _fresh(self) -> np.ndarray:
        return self._new_counts(self.reference.shape[0])

    def statistics(self) -> dict[str, np.ndarray]:
        current = self.window()
        return {name: np.asarray(fn(self.reference, current)) for name, fn in CATEGORICAL_STATISTICS.items()}

    def observed_buckets(self) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
        """Per feature, the hashed category buckets as histogram buckets: bucket k below bound k."""
        observed = self.observed
        if observed is None:
            return []
        observed = observed.copy()
        bounds = tuple(float(k) for k in range(observed.shape[1] - 1))
        return [(bounds, tuple(map(int, row))) for row in observed]


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
        self.sampled = 0  # requests counted
        self._watch_inputs = set(config.inputs) if (config.inputs or config.outputs) else None
        self._watch_outputs = set(config.outputs)

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
        credit = self._sample_credit + self._sample_step
        if credit < self._sample_period:
            self._sample_credit = credit
            return
        self._sample_credit = credit - self._sample_period
        self.sampled += 1
        closed = False
        sample: dict[str, np.ndarray] = {}
        raw_inputs = request.raw_input_contents
        for index, tensor in enumerate(request.inputs):
            if self._watch_inputs is not None and tensor.name not in self._watch_inputs:
                continue
            if not raw_inputs:
                continue  # typed contents: converted to raw only on the batching path
            if tensor.datatype == "BYTES":
                features = math.prod(tensor.shape[1:]) if len(tensor.shape) > 1 else 1
                closed |= self.tensor(tensor.name, "input", CategoricalMonitor).update_raw(raw_inputs[index], features)
                continue
            block = tensor_block(tensor.datatype, tensor.shape, raw_inputs[index], *self._shape_of(tensor.name))
            if block is not None:
                closed |= self.tensor(tensor.name, "input").update(block)
                sample[f"input/{tensor.name}"] = block
        if response is not None and self._watch_outputs:
            for index, tensor in enumerate(response.outputs):
                if tensor.name in self._watch_outputs and index < len(response.raw_output_contents):
                    block = tensor_block(tensor.datatype, tensor.shape, response.raw_output_contents[index], *self._shape_of(tensor.name))
                    if block is not None:
                        closed |= self.tensor(tensor.name, "output").update(block)
                        sample[f"output/{tensor.name}"] = block
        if sample and len({len(v) for v in sample.values()}) == 1:
            self.reservoir.offer(sample)
        if closed:
            self.evaluate()

    def _shape_of(self, name: str) -> tuple[tuple[int, ...], str]:
        return self.config.features.get(name, ()), self.config.reduction.get(name, "none")

    def evaluate(self) -> dict:
        """Compare every full window with its reference, update alert states, and report."""
        features: list[dict] = []
        now = time.time()
        for (kind, name), monitor in self.tensors.items():
            if monitor.reference is None or not monitor.has_full_window:
                continue
            stats = monitor.statistics()
            for feature in range(monitor.reference.shape[0]):
                values = {stat: float(array[feature]) for stat, array in stats.items()}
                level = OK
                for stat, (warning, alert) in self.config.thresholds.items():
                    if stat not in values:  # e.g. ks or wasserstein of a categorical tensor
                        continue
                    key = (f"{kind}/{name}", feature, stat)
                    state = self.alert_states.get(key)
                    if state is None:
                        state = AlertState(warning, alert, self.config.consecutive, self.config.clear_after)
                        self.alert_states[key] = state
                    changed = state.observe(values[stat])
                    if changed is not None:
                        self._fire(kind, name, monitor, feature, stat, values, changed, now)
                    level = max(level, state.level, key=["ok", "warning", "alert"].index)
                features.append({"tensor": f"{kind}/{name}", "feature": self.feature_label(monitor, feature),
                                 "statistics": values, "level": level})
        self.windows_evaluated += 1
        self.last_report = {
            "model": self.model, "time": now, "window_rows": self.config.window_rows,
            "windows_evaluated": self.windows_evaluated, "features": features,
        }
        return self.last_report

    @staticmethod
    def feature_label(monitor: TensorMonitor, feature: int) -> int:
        """The feature's name in reports and metrics: its column in the tensor when features were picked."""
        return monitor.features[feature] if monitor.features else feature

    def load_profile(self, profile: dict) -> int:
        """Set references from a saved profile ({"input/NAME": {"edges": ..., "reference": ...}});
        returns how many tensors it set. Raises KeyError, ValueError or TypeError on a malformed one."""
        for key, entry in profile.items():
            kind, _, name = key.partition("/")
            self.tensor(name, kind).set_reference_counts(np.array(entry["edges"]), np.array(entry["reference"]))
        return len(profile)

    def reference_from_current_window(self) -> int:
        """Take each tensor's current window as its new reference; returns how many tensors had one."""
        changed = 0
        for tensor in self.tensors.values():
            if tensor.reference is not None and tensor.has_window:
                tensor.set_reference_counts(tensor.edges, tensor.window())
                changed += 1
        return changed

    def forget_references(self) -> None:
        """Learn every reference again from the next rows."""
        for tensor in self.tensors.values():
            tensor.forget_reference()

    def _fire(self, kind, name, monitor, feature, stat, values, level, now) -> None:
        if level != OK:
            self.alerts_fired += 1
        self.on_alert({
            "model": self.model, "tensor": f"{kind}/{name}", "feature": self.feature_label(monitor, feature),
            "statistic": stat, "value": values[stat], "level": level,
            "thresholds": list(self.config.thresholds[stat]), "time": now, "statistics": values,
        })

    def histograms(self) -> dict[str, dict]:
        """Reference and current window counts per tensor (for reports, plots and merging)."""
        out = {}
        for (kind, name), monitor in self.tensors.items():
            if monitor.reference is None:
                continue
            out[f"{kind}/{name}"] = {
                "categorical": isinstance(monitor, CategoricalMonitor),
                "edges": monitor.edges.tolist(), "reference": monitor.reference.tolist(),
                "current": monitor.window().tolist() if monitor.has_window else None,
            }
        return out
