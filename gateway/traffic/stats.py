"""What a rollout compares: per version (live) and per shadow target, requests, errors, latency, outputs.

`LatencyHistogram` keeps durations on the √2 ladder the telemetry stage uses (so the figures read
the same as the exported histograms); `OutputComparison` bins the live version's and the shadow's
values of one output tensor on the same quantile edges, learned from the first live outputs, with
the drift kernels (gateway/ext/drift), and compares them (PSI, KS) when asked.
"""

from __future__ import annotations

import logging
from bisect import bisect_right

import numpy as np

from gateway.ext import drift as kernels
from gateway.ext.drift import histogram as histogram_kernels
from gateway.protocol.tensors import NUMPY_DTYPES

log = logging.getLogger(__name__)

#: Upper bounds in seconds, 2^(i/2) for i in -30..12 (31 µs .. 64 s), as telemetry's duration ladder.
BOUNDS_S = tuple(2.0 ** (i / 2) for i in range(-30, 13))


class LatencyHistogram:
    """Durations counted on fixed bounds; percentiles read back at the bucket's upper bound."""

    __slots__ = ("counts", "count", "total_s", "max_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_S) + 1)
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect_right(BOUNDS_S, seconds)] += 1
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def percentile(self, share: float) -> float | None:
        """Seconds below which `share` of the durations fall (a bucket's upper bound), None if empty."""
        if not self.count:
            return None
        rank, running = share * self.count, 0
        for index, count in enumerate(self.counts):
            running += count
            if running >= rank and count:
                return BOUNDS_S[index] if index < len(BOUNDS_S) else self.max_s
        return self.max_s

    def summary(self) -> dict:
        to_ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
        return {
            "count": self.count,
            "mean_ms": to_ms(self.total_s / self.count) if self.count else None,
            "p50_ms": to_ms(self.percentile(0.5)),
            "p99_ms": to_ms(self.percentile(0.99)),
            "max_ms": to_ms(self.max_s) if self.count else None,
        }


class TrafficCounters:
    """Requests, errors (by status) and latency of one version's live traffic, or of a shadow's copies."""

    __slots__ = ("requests", "errors", "statuses", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.statuses: dict[str, int] = {}
        self.latency = LatencyHistogram()

    def record(self, seconds: float, error: BaseException | None) -> None:
        self.requests += 1
        if error is not None:
            self.errors += 1
            status = getattr(getattr(error, "code", None), "name", None) or type(error).__name__
            self.statuses[status] = self.statuses.get(status, 0) + 1
        else:
            self.latency.record(seconds)  # latency of answers; failures are counted apart

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            "statuses": dict(self.statuses),
            "latency": self.latency.summary(),
        }


def output_values(response, output: str) -> np.ndarray | None:
    """The values of one numeric output tensor of a ModelInferResponse as a float64 column [N, 1]
    (the first output when `output` is empty); None when the response has no such numeric output."""
    outputs = response.outputs
    for index, tensor in enumerate(outputs):
        if output and tensor.name != output:
            continue
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        if dtype is None or tensor.datatype == "BYTES" or index >= len(response.raw_output_contents):
            return None
        values = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        return values.astype(np.float64).reshape(-1, 1)
    return None


class OutputComparison:
    """Histograms of one output's values on shared edges, one per side: the `reference` side (the
    live version, or a split's stable version) and the others (a shadow, a split's canaries), each
    compared with the reference by PSI and KS. The edges are quantiles of the reference's first
    `learn_values` values; other sides' values seen meanwhile wait (bounded) and are counted then."""

    def __init__(self, output: str, bins: int, learn_values: int, reference: str = "live") -> None:
        self.output = output
        self.bins = bins
        self.learn_values = learn_values
        self.reference = reference
        self.edges: np.ndarray | None = None
        self.counts: dict[str, np.ndarray] = {}
        self._waiting: dict[str, list[np.ndarray]] = {}
        self._waiting_values: dict[str, int] = {}
        self.unreadable = 0  # responses without the output (or not numeric)

    @property
    def live(self) -> np.ndarray | None:
        return self.counts.get(self.reference)

    @property
    def shadow(self) -> np.ndarray | None:
        return self.counts.get("shadow")

    def add(self, side: str, response) -> None:
        values = output_values(response, self.output)
        if values is None:
            self.unreadable += 1
            return
        if self.edges is None:
            seen = self._waiting_values.get(side, 0)
            if seen < self.learn_values * 4:  # bounded while the edges are learned
                self._waiting.setdefault(side, []).append(values)
                self._waiting_values[side] = seen + len(values)
            if side == self.reference and self._waiting_values[side] >= self.learn_values:
                self._learn()
            return
        self._count(side, values)

    def _learn(self) -> None:
        self.edges = kernels.quantile_edges(np.concatenate(self._waiting[self.reference]), self.bins)
        waiting, self._waiting = self._waiting, {}
        for side, blocks in waiting.items():
            for block in blocks:
                self._count(side, block)

    def _count(self, side: str, values: np.ndarray) -> None:
        counts = self.counts.get(side)
        if counts is None:
            counts = self.counts[side] = kernels.new_histogram(self.edges)
        update = kernels.update_histogram if kernels.USING_EXTENSIONS and WARM[0] else histogram_kernels.update_histogram_numpy
        update(counts, self.edges, np.ascontiguousarray(values))

    def summary(self) -> dict:
        """{output, learning, edges, reference, counts per side, psi and ks per side vs the reference}."""
        if self.edges is None:
            return {"output": self.output or "(first)", "learning": True, "reference": self.reference,
                    "values_seen": dict(self._waiting_values)}
        psi, ks = ((kernels.population_stability_index, kernels.ks_statistic) if WARM[0] or not kernels.USING_EXTENSIONS
                   else (kernels.psi.psi_numpy, kernels.ks.ks_numpy))
        reference = self.counts.get(self.reference)
        compared = {}
        for side, counts in sorted(self.counts.items()):
            if side == self.reference or reference is None or not counts.sum() or not reference.sum():
                continue
            compared[side] = {"psi": float(psi(reference, counts)[0]), "ks": float(ks(reference, counts)[0])}
        return {
            "output": self.output or "(first)",
            "learning": False,
            "reference": self.reference,
            "edges": [round(float(e), 6) for e in self.edges[0]],
            "counts": {side: counts[0].tolist() for side, counts in sorted(self.counts.items())},
            "compared": compared,
            "unreadable": self.unreadable,
        }


#: Whether the Numba kernels are compiled (warm_up ran off the event loop); the NumPy twins count
#: the same until then, so no request waits for a compilation.
WARM = [False]


def warm_up() -> None:
    """Compile the drift kernels the comparison uses (run in a thread)."""
    try:
        kernels.warm_up()
        WARM[0] = True
    except Exception:  # noqa: BLE001 — the twins keep counting
        log.exception("drift kernels did not compile; output comparison stays on the NumPy twins")
