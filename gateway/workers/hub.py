"""The parent's hub: receives the workers' reports on a local socket and answers as one gateway.

It owns what must exist once for all workers: the Prometheus endpoint and the OTLP metric stream
(a TelemetryStage reading the merged reports), and the drift windows, alerts and their sinks (a
DriftStage counting the rows every worker sampled, so a window sees all the traffic and an alert
fires once). It serves, on its socket, the workers' Report/Counts/Snapshot calls and the real
drift admin service, which each worker's admin API forwards to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import logging
import time
from typing import Callable

from gateway.admin.drift_service import DriftService
from gateway.config import GatewayConfig
from gateway.drift.stage import DriftStage
from gateway.server.engines.grpcio import GrpcioEngine
from gateway.server.rpc import Call, Method
from gateway.telemetry.stage import GatewayView, TelemetryStage
from gateway.workers.link import COUNTS, REPORT, SNAPSHOT
from gateway.workers.merge import (
    MergedAggregates,
    Totals,
    merged_backends,
    merged_batching,
    merged_batching_snapshot,
    merged_totals,
)
from gateway.workers.report import WorkerReport, decode

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 256 * 1024 * 1024


class Hub:
    """`workers_status()`: the supervisor's view of its processes ({id: {...}}), for the snapshot."""

    def __init__(self, config: GatewayConfig, workers_status: Callable[[], dict] = dict) -> None:
        self.config = config
        self.workers_status = workers_status
        self.latest: dict[int, WorkerReport] = {}
        self.received_at: dict[int, float] = {}
        self.retired = Totals()  # replaced, never changed in place: exporter threads read it
        self.reports = 0
        self.drift = DriftStage(config.drift)
        self.telemetry = None
        if config.telemetry.enabled:
            # Traces stay with the workers (each span is whole where it was made); metrics are merged here.
            telemetry_config = dataclasses.replace(config.telemetry, trace_sampling_ratio=0.0)
            self.telemetry = TelemetryStage(telemetry_config, self._view(), aggregates=MergedAggregates(self.totals))
            self.drift.hooks.append(self.telemetry.drift_hook)
        self._engine: GrpcioEngine | None = None

    def __repr__(self) -> str:
        return f"<Hub workers={sorted(self.latest)} reports={self.reports} {self.drift!r}>"

    def _view(self) -> GatewayView:
        return GatewayView(
            backends=lambda: merged_backends(list(self.latest.values()), self.totals()),
            routing_decisions=lambda: self.totals().routing,
            batched_models=lambda: [(b.name, b.version, b, b.waiting)
                                    for b in merged_batching(list(self.latest.values()), self.totals())],
            drift_monitors=lambda: self.drift.monitors,
        )

    def totals(self) -> Totals:
        """Every worker's cumulative numbers, added up (including workers that have since restarted)."""
        return merged_totals(self.retired, list(self.latest.values()))

    # -- the workers' calls --------------------------------------------------------------------

    def methods(self) -> list[Method]:
        return [
            Method(REPORT, False, self._report),
            Method(COUNTS, False, self._counts),
            Method(SNAPSHOT, False, self._snapshot),
            *DriftService(self.drift).methods(),
        ]

    async def _report(self, raw: bytes, call: Call) -> bytes:
        self.receive(decode(raw))
        return b""

    def receive(self, report: WorkerReport) -> None:
        for model, (groups, sampled) in report.drift.items():
            self.drift.count_forwarded(model, groups, sampled)
        report.drift = {}
        self.reports += 1
        previous = self.latest.get(report.worker_id)
        if previous is not None and previous.pid != report.pid:
            self._retire(previous)  # a restarted worker counts from zero again
        if report.final:
            self.latest.pop(report.worker_id, None)
            self._retire(report)
        else:
            self.latest[report.worker_id] = report
            self.received_at[report.worker_id] = time.monotonic()

    def _retire(self, report: WorkerReport) -> None:
        self.retired = self.retired.copy().add(report)

    def worker_exited(self, worker_id: int, pid: int) -> None:
        """A worker process ended: keep its counts, forget its gauges."""
        report = self.latest.get(worker_id)
        if report is not None and report.pid == pid:
            del self.latest[worker_id]
            self._retire(report)

    def report_age_s(self, worker_id: int) -> float | None:
        received = self.received_at.get(worker_id)
        return None if received is None else time.monotonic() - received

    async def _counts(self, raw: bytes, call: Call) -> bytes:
        asker = int(raw.decode() or -1)
        others = [report for worker_id, report in list(self.latest.items()) if worker_id != asker]
        return pickle.dumps(merged_totals(self.retired, others).counts)

    async def _snapshot(self, raw: bytes, call: Call) -> bytes:
        return json.dumps(self.snapshot(), default=str).encode()

    def snapshot(self) -> dict:
        """The merged live state: backends, routing, sequences, batching, drift, and the workers."""
        reports = list(self.latest.values())
        totals = self.totals()
        workers = self.workers_status()
        for report in reports:  # what each live worker answered so far (its ModelStatistics counts)
            answered = sum(c.success_count + c.fail_count for c in report.counts.values())
            workers.setdefault(str(report.worker_id), {})["requests"] = answered
        return {
            "workers": workers,
            "backends": {
                b.address: {"pool": b.pool, "health": b.health or ("healthy" if b.healthy else "unhealthy"),
                            "detail": b.detail, "outstanding": b.outstanding, "served": b.served, "failed": b.failed}
                for b in merged_backends(reports, totals)
            },
            "routing": {f"{pool}/{reason}": count for (pool, reason), count in sorted(totals.routing.items())},
            "sequences": sum(report.sequences for report in reports),
            "batching": merged_batching_snapshot([report.snapshot.get("batching", {}) for report in reports]),
            "drift": {model: repr(monitor) for model, monitor in self.drift.monitors.items()},
            "requests": sum(series.count for series in totals.requests.values()),
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Serve the workers on `address` (unix:/path); start the drift kernels and the exporters."""
        if self.drift.monitors:
            await self.drift.start()
        if self.telemetry is not None:
            self.telemetry.start()
        self._engine = GrpcioEngine(address, self.methods(), max_receive_bytes=MAX_REPORT_BYTES,
                                    max_send_bytes=MAX_REPORT_BYTES)
        await self._engine.start()

    @property
    def prometheus_port(self) -> int | None:
        return None if self.telemetry is None else self.telemetry.prometheus_port

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.stop(1.0)
            self._engine = None
        await self.drift.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)
