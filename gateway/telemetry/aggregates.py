"""Request aggregates kept on the hot path as C counters (ext/histogram.pyx), read at collection time.

Recording through the OpenTelemetry SDK costs ~5-9 µs a call; an observer that finds a request's
three series with one dict lookup by a tuple of objects it already holds (model entry, backend,
status) and counts in C costs a few hundred ns for all three (benchmarks/bench_telemetry.py). The SDK sees these counts only when a reader collects (a Prometheus
scrape, an OTLP export), as cumulative sums and cumulative histograms.

Thread model: `record` runs on the gateway's event loop thread; `snapshot` runs on an exporter's
thread. Series are only ever appended and counters only grow, so a snapshot (copied under the GIL)
is at worst a request behind — and each histogram's count is the sum of its own bucket counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import grpc

from gateway.telemetry.histogram import DURATION_BOUNDS_NS, BucketCounts

OK = grpc.StatusCode.OK

#: The model (or version) label of refused requests naming a model or version the fleet does not
#: serve: client-chosen names must not mint new time series.
UNKNOWN = "_unknown"


#: The status attribute, as the semantic conventions name it (a string, e.g. "OK").
STATUS = "rpc.response.status_code"


class Series:
    """The histogram of one attribute set (for requests, its count is the request counter)."""

    __slots__ = ("attributes", "histogram")

    def __init__(self, attributes: dict) -> None:
        self.attributes = attributes
        self.histogram = BucketCounts(DURATION_BOUNDS_NS)


@dataclass(frozen=True)
class SeriesSnapshot:
    attributes: dict
    count: int
    sum_s: float
    min_s: float
    max_s: float
    bucket_counts: tuple[int, ...]

    @property
    def failed(self) -> bool:
        return self.attributes.get(STATUS, "OK") != "OK"


class _Family:
    """Series of one histogram, keyed by whatever tuple the hot path holds."""

    def __init__(self) -> None:
        self._series: dict[object, Series] = {}
        self._by_attributes: dict[tuple, Series] = {}
        self._all: list[Series] = []  # append-only: what a collector iterates

    def __len__(self) -> int:
        return len(self._all)

    def series(self, key, labels: Callable[..., dict], *args) -> BucketCounts:
        """The counts of `key`'s series. On the first sight of a key, its attributes are
        `labels(*args)`; two keys with the same attributes (say, a refused and an admitted request
        that both failed before reaching a backend) share one series, as an exporter requires."""
        series = self._series.get(key)
        if series is None:
            attributes = labels(*args)
            identity = tuple(sorted(attributes.items()))
            series = self._by_attributes.get(identity)
            if series is None:
                series = self._by_attributes[identity] = Series(attributes)
                self._all.append(series)
            self._series[key] = series
        return series.histogram

    def record(self, key, value: int, labels: Callable[..., dict], *args) -> None:
        """Record `value` in the series of `key` (see `series`)."""
        self.series(key, labels, *args).record(value)

    def snapshot(self) -> list[SeriesSnapshot]:
        out = []
        for series in self._all[:]:
            counts, total, minimum, maximum = series.histogram.snapshot()
            out.append(SeriesSnapshot(series.attributes, sum(counts), total / 1e9, minimum / 1e9, maximum / 1e9, counts))
        return out


def _request_labels(model: str, version: str, backend, code: grpc.StatusCode) -> dict:
    return {"model": model, "version": version, **_backend_labels(backend), STATUS: code.name}


def _backend_labels(backend) -> dict:
    return {"pool": backend.pool if backend is not None else "",
            "backend": backend.address if backend is not None else ""}


def _backend_time_labels(entry, backend) -> dict:
    return {"model": entry.name, "version": entry.version, **_backend_labels(backend)}


def _queue_time_labels(entry) -> dict:
    return {"model": entry.name, "version": entry.version}


class RequestAggregates:
    """Per request: its duration (by model, version, pool, backend, status), its time at the backend
    (by model, version, pool, backend) and its time in a batch queue (by model, version)."""

    def __init__(self) -> None:
        self.requests = _Family()
        self.backend_time = _Family()
        self.queue_time = _Family()
        # (entry, backend, status) -> [duration, backend-call, queue-time counts]: one lookup a
        # request finds all three (the last two made on first need: a series is exported once used).
        self._rows: dict[tuple, list] = {}

    def __repr__(self) -> str:
        return f"<RequestAggregates series={len(self.requests)}>"

    def record(self, exchange, code: grpc.StatusCode) -> None:
        entry, backend = exchange.entry, exchange.backend
        row = self._rows.get((entry, backend, code))
        if row is None:
            row = self._rows[entry, backend, code] = [
                self.requests.series((entry, backend, code), _request_labels, entry.name, entry.version, backend, code),
                None, None]
        row[0].record(exchange.elapsed_ns)
        if backend is not None and exchange.upstream_ns:
            counts = row[1]
            if counts is None:
                counts = row[1] = self.backend_time.series((entry, backend), _backend_time_labels, entry, backend)
            counts.record(exchange.upstream_ns)
        if exchange.batch_rows:
            counts = row[2]
            if counts is None:
                counts = row[2] = self.queue_time.series(entry, _queue_time_labels, entry)
            counts.record(exchange.queued_ns)

    def record_refusal(self, model: str, version: str, code: grpc.StatusCode, elapsed_ns: int) -> None:
        """A request refused before admission (unknown model, invalid tensors): no backend saw it."""
        self.requests.record(("refused", model, version, code), elapsed_ns, _request_labels, model, version, None, code)

    def snapshot(self) -> list[SeriesSnapshot]:
        """The request-duration series (their counts are the request counters)."""
        return self.requests.snapshot()
