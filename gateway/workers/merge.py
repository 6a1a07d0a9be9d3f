"""Adding worker reports up into one gateway's numbers.

Counters and histograms add (series by their attributes, bucket by bucket: every worker uses the
same bucket bounds); min and max of a histogram are the least and greatest over the workers. Gauges
are summed where they count things (requests in flight at a backend, requests waiting for a batch)
and a backend is healthy only while every live worker has it in rotation.

A worker that dies or restarts starts its counters from zero again; its last report is folded into
`Totals.retired` so that merged counters never go down (what it did after its last report, at most
`server.workers_report_s` of traffic, is lost).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

from gateway.server.model_statistics import GatewayCounts
from gateway.telemetry.aggregates import SeriesSnapshot
from gateway.workers.report import BackendGauge, BatchedGauge, WorkerReport


def _identity(attributes: dict) -> tuple:
    return tuple(sorted(attributes.items()))


def add_series(into: dict[tuple, SeriesSnapshot], series: Iterable[SeriesSnapshot]) -> None:
    """Add histogram series into `into` ({attribute identity: series})."""
    for one in series:
        key = _identity(one.attributes)
        have = into.get(key)
        if have is None or not have.count:
            into[key] = one
        elif one.count:
            into[key] = SeriesSnapshot(
                have.attributes, have.count + one.count, have.sum_s + one.sum_s, min(have.min_s, one.min_s),
                max(have.max_s, one.max_s), tuple(a + b for a, b in zip(have.bucket_counts, one.bucket_counts)),
            )


def _add_counts(into: dict, counts: dict) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


@dataclass
class Totals:
    """Cumulative numbers of one or more reports, added up."""

    requests: dict[tuple, SeriesSnapshot] = field(default_factory=dict)
    backend_time: dict[tuple, SeriesSnapshot] = field(default_factory=dict)
    queue_time: dict[tuple, SeriesSnapshot] = field(default_factory=dict)
    routing: dict[tuple[str, str], int] = field(default_factory=dict)
    batch_sizes: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    counts: dict[tuple[str, str], GatewayCounts] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    def add(self, report: WorkerReport) -> "Totals":
        add_series(self.requests, report.requests)
        add_series(self.backend_time, report.backend_time)
        add_series(self.queue_time, report.queue_time)
        _add_counts(self.routing, report.routing)
        for batched in report.batching:
            _add_counts(self.batch_sizes.setdefault((batched.name, batched.version), {}), batched.batch_sizes)
        for key, counts in report.counts.items():
            self.counts[key] = self.counts[key] + counts if key in self.counts else counts
        for backend in report.backends:
            self.served[backend.address] = self.served.get(backend.address, 0) + backend.served
            self.failed[backend.address] = self.failed.get(backend.address, 0) + backend.failed
        return self

    def copy(self) -> "Totals":
        return copy.deepcopy(self)


def merged_totals(retired: Totals, reports: Iterable[WorkerReport]) -> Totals:
    """What the retired incarnations did plus the live workers' latest reports."""
    totals = retired.copy()
    for report in reports:
        totals.add(report)
    return totals


def merged_backends(reports: list[WorkerReport], totals: Totals) -> list[BackendGauge]:
    """Each backend once: in rotation only while every live worker has it; requests in flight summed."""
    merged: dict[str, BackendGauge] = {}
    for report in reports:
        for backend in report.backends:
            have = merged.get(backend.address)
            if have is None:
                merged[backend.address] = backend
                continue
            worst = have if not have.healthy else backend
            merged[backend.address] = BackendGauge(
                backend.address, backend.pool, have.healthy and backend.healthy,
                have.outstanding + backend.outstanding, worst.health, worst.detail,
            )
    return [
        BackendGauge(b.address, b.pool, b.healthy, b.outstanding, b.health, b.detail,
                     totals.served.get(b.address, 0), totals.failed.get(b.address, 0))
        for b in merged.values()
    ]


def merged_batching(reports: list[WorkerReport], totals: Totals) -> list[BatchedGauge]:
    waiting: dict[tuple[str, str], int] = {}
    for report in reports:
        for batched in report.batching:
            key = (batched.name, batched.version)
            waiting[key] = waiting.get(key, 0) + batched.waiting
    keys = sorted(set(waiting) | set(totals.batch_sizes))
    return [BatchedGauge(name, version, dict(totals.batch_sizes.get((name, version), {})), waiting.get((name, version), 0))
            for name, version in keys]


_SUMMED = ("batches", "requests", "rows", "rejected_queue_full", "rejected_deadline", "expired_in_queue", "waiting")


def merged_batching_snapshot(snapshots: list[dict]) -> dict:
    """The workers' `batching` snapshots (per 'model:version') added up; means weighted by requests."""
    merged: dict[str, dict] = {}
    for snapshot in snapshots:
        for model, one in snapshot.items():
            have = merged.setdefault(model, {**one, **{k: 0 for k in _SUMMED}, "batch_sizes": {}, "reasons": {},
                                             "queue_delay_us_total": 0.0, "max_queue_delay_us": 0.0})
            for key in _SUMMED:
                have[key] += one.get(key, 0)
            _add_counts(have["batch_sizes"], {int(k): v for k, v in one.get("batch_sizes", {}).items()})
            _add_counts(have["reasons"], one.get("reasons", {}))
            have["queue_delay_us_total"] += one.get("mean_queue_delay_us", 0.0) * one.get("requests", 0)
            have["max_queue_delay_us"] = max(have["max_queue_delay_us"], one.get("max_queue_delay_us", 0.0))
    for have in merged.values():
        total = have.pop("queue_delay_us_total")
        have["mean_queue_delay_us"] = total / have["requests"] if have["requests"] else 0.0
        have["mean_batch_rows"] = have["rows"] / have["batches"] if have["batches"] else 0.0
    return merged


class MergedAggregates:
    """The request histograms of every worker, read as TelemetryStage reads RequestAggregates."""

    class _Family:
        def __init__(self, read) -> None:
            self._read = read

        def snapshot(self) -> list[SeriesSnapshot]:
            return list(self._read().values())

    def __init__(self, totals) -> None:
        """`totals()`: the merged Totals now."""
        self._totals = totals
        self.backend_time = self._Family(lambda: self._totals().backend_time)
        self.queue_time = self._Family(lambda: self._totals().queue_time)

    def __repr__(self) -> str:
        return "<MergedAggregates of the workers>"

    def snapshot(self) -> list[SeriesSnapshot]:
        return list(self._totals().requests.values())
