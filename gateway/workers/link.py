"""A worker's line to its parent's hub: reports out, merged answers in.

Every `report_s` the worker ships a WorkerReport (its cumulative counters and its live gauges, plus
the drift rows it sampled since the last one) over the hub's local socket. Requests never wait on
this: the report is taken between requests, on the worker's event loop, and sent as one call.
ModelStatistics, the admin snapshot and the drift service ask the hub when a client asks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Callable

import grpc

from gateway.errors import GatewayError, Unavailable
from gateway.server.rpc import Call, Method
from gateway.workers.report import WorkerReport, decode
from gateway.workers.role import WorkerRole

log = logging.getLogger(__name__)

HUB_SERVICE = "tensorgate.workers.v1.Hub"
REPORT, COUNTS, SNAPSHOT = (f"/{HUB_SERVICE}/{name}" for name in ("Report", "Counts", "Snapshot"))

#: Drift rows a worker keeps while the hub cannot take them; more are dropped (and counted).
MAX_BUFFERED_DRIFT_BYTES = 64 * 1024 * 1024


class HubError(GatewayError):
    """A status the hub answered with, passed on to the client as it is."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _identity(raw: bytes) -> bytes:
    return raw


class WorkerLink:
    """The worker side. `forward_drift` is DriftStage's `forward`; `peer_counts` is
    InferenceService's; `proxy` turns a service's Methods into calls to the hub's."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self.reports_sent = 0
        self.reports_failed = 0
        self.drift_dropped_rows = 0
        self._drift: dict[str, list] = {}  # model -> [groups, requests sampled]
        self._drift_bytes = 0
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._collect: Callable[[], WorkerReport] | None = None

    def __repr__(self) -> str:
        return (f"<WorkerLink worker={self.role.worker_id} hub={self.role.hub} sent={self.reports_sent} "
                f"failed={self.reports_failed}>")

    # -- drift rows ----------------------------------------------------------------------------

    def forward_drift(self, model: str, groups: dict, sampled: int) -> None:
        size = sum(len(part) for _, parts in groups.values() for part in parts)
        if self._drift_bytes + size > MAX_BUFFERED_DRIFT_BYTES:
            self.drift_dropped_rows += sum(rows for rows, _ in groups.values())
            return
        self._drift_bytes += size
        pending = self._drift.get(model)
        if pending is None:
            self._drift[model] = [groups, sampled]
            return
        joined = pending[0]
        for key, (rows, parts) in groups.items():
            have = joined.get(key)
            if have is None:
                joined[key] = [rows, parts]
            else:
                have[0] += rows
                have[1].extend(parts)
        pending[1] += sampled

    # -- reports --------------------------------------------------------------------------------

    async def start(self, collect: Callable[[], WorkerReport]) -> None:
        """Connect to the hub and report every `report_s` (on this event loop)."""
        self._collect = collect
        self._channel = grpc.aio.insecure_channel(self.role.hub)
        self._task = asyncio.ensure_future(self._report_every())

    async def _report_every(self) -> None:
        while True:
            await asyncio.sleep(self.role.report_s)
            try:
                await self.report()
            except Exception:  # a report that cannot be taken must not end the reporting
                self.reports_failed += 1
                log.exception("worker %d: taking a report failed", self.role.worker_id)

    async def report(self, final: bool = False) -> bool:
        """Ship one report now; False when the hub could not take it (its drift rows are kept)."""
        report = self._collect()
        report.final = final
        drift, report.drift = self._drift, {model: (groups, sampled) for model, (groups, sampled) in self._drift.items()}
        self._drift, self._drift_bytes = {}, 0
        try:
            await self._call(REPORT, report.encode(), timeout=5.0)
        except GatewayError as error:
            self.reports_failed += 1
            if self.reports_failed == 1 or self.reports_failed % 100 == 0:
                log.warning("worker %d: report to the hub failed (%d times): %s",
                            self.role.worker_id, self.reports_failed, error.message)
            for model, (groups, sampled) in drift.items():  # kept for the next report
                self.forward_drift(model, groups, sampled)
            return False
        self.reports_sent += 1
        return True

    async def close(self) -> None:
        """Send the last report (the counters are final now) and disconnect."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._channel is not None:
            if self._collect is not None:
                await self.report(final=True)
            await self._channel.close()
            self._channel = None

    # -- asking the hub -------------------------------------------------------------------------

    async def _call(self, path: str, raw: bytes, timeout: float) -> bytes:
        if self._channel is None:
            raise Unavailable("this worker is not connected to its parent's hub")
        call = self._channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
        try:
            return await call(raw, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"the workers' parent (hub {self.role.hub}) did not answer: {error.details()}") from None
            raise HubError(error.code(), error.details() or "") from None

    async def peer_counts(self) -> dict:
        """The other workers' ModelStatistics counts, by (model, version)."""
        return decode(await self._call(COUNTS, str(self.role.worker_id).encode(), timeout=2.0))

    async def merged_snapshot(self, own: dict) -> dict:
        """The hub's merged snapshot, with this worker's id and live state."""
        merged = json.loads(await self._call(SNAPSHOT, str(self.role.worker_id).encode(), timeout=5.0))
        merged["worker"] = {"id": self.role.worker_id, "pid": os.getpid(), "link": repr(self)}
        merged.setdefault("per_worker", {})[str(self.role.worker_id)] = own
        return merged

    def proxy(self, methods: list[Method]) -> list[Method]:
        """The same unary Methods, answered by the hub (which serves the real ones on its socket)."""
        return [Method(method.path, False, self._forwarder(method.path)) for method in methods]

    def _forwarder(self, path: str):
        async def forward(raw: bytes, call: Call) -> bytes:
            return await self._call(path, raw, timeout=10.0)

        forward.__name__ = path.rpartition("/")[2]
        return forward
