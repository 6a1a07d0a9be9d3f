"""Request aggregates kept on the hot path as plain Python counters, read at collection time.

Recording through the OpenTelemetry SDK costs ~9 µs a call; an observer that bumps a few ints in
a pre-resolved `Series` costs well under 1 µs. The SDK sees these counters only when a reader
collects (a Prometheus scrape, an OTLP export), as cumulative sums and a cumulative histogram.

Thread model: `record` runs on the gateway's event loop thread; `snapshot` runs on an exporter's
thread. Series are only ever appended and counters only grow, so a snapshot (copied under the GIL)
is at worst a request behind — and its histogram count is the sum of its own bucket counts.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import grpc

#: Latency bucket upper bounds, seconds: exponential, 100 µs · 2^k up to ~52 s (20 bounds, 21 buckets).
BOUNDS_S: tuple[float, ...] = tuple(1e-4 * 2.0**k for k in range(20))
_BOUNDS_NS: list[int] = [round(bound * 1e9) for bound in BOUNDS_S]

OK = grpc.StatusCode.OK


class Series:
    """Counters of one (model, version, gRPC status)."""

    __slots__ = ("attributes", "code", "buckets", "sum_ns", "min_ns", "max_ns")

    def __init__(self, model: str, version: str, code: grpc.StatusCode) -> None:
        self.code = code
        # Semantic conventions name the RPC status `rpc.response.status_code` (a string, e.g. "OK").
        self.attributes = {"model": model, "version": version, "rpc.response.status_code": code.name}
        self.buckets = [0] * (len(_BOUNDS_NS) + 1)
        self.sum_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    def record(self, elapsed_ns: int) -> None:
        buckets = self.buckets
        if elapsed_ns > self.max_ns:
            self.max_ns = elapsed_ns
        if elapsed_ns < self.min_ns or not self.sum_ns:
            self.min_ns = elapsed_ns
        self.sum_ns += elapsed_ns
        buckets[bisect_right(_BOUNDS_NS, elapsed_ns - 1)] += 1  # bounds are inclusive upper limits


@dataclass(frozen=True)
class SeriesSnapshot:
    attributes: dict
    code: grpc.StatusCode
    count: int
    sum_s: float
    min_s: float
    max_s: float
    bucket_counts: tuple[int, ...]


class RequestAggregates:
    """Request count, errors by status and a latency histogram per (model, version, status)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, grpc.StatusCode], Series] = {}
        self._all: list[Series] = []  # append-only: what a collector iterates

    def __repr__(self) -> str:
        return f"<RequestAggregates series={len(self._all)}>"

    def series(self, model: str, version: str, code: grpc.StatusCode) -> Series:
        key = (model, version, code)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(model, version, code)
            self._all.append(found)
        return found

    def record(self, model: str, version: str, code: grpc.StatusCode, elapsed_ns: int) -> None:
        key = (model, version, code)
        found = self._series.get(key)
        if found is None:
            found = self.series(model, version, code)
        found.record(elapsed_ns)

    def snapshot(self) -> list[SeriesSnapshot]:
        out = []
        for series in self._all[:]:
            buckets = tuple(series.buckets)  # one copy: count is the sum of exactly these
            out.append(SeriesSnapshot(series.attributes, series.code, sum(buckets), series.sum_ns / 1e9,
                                      series.min_ns / 1e9, series.max_ns / 1e9, buckets))
        return out
