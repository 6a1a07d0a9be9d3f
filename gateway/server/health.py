"""`grpc.health.v1.Health`: SERVING while at least one backend is healthy and the gateway is not
draining (server/readiness.py), for '' and the inference service.

Check answers at once; Watch sends the status now and again each time it changes (the fleet tells
when its health changes), as Kubernetes probes and service meshes expect.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from grpc_health.v1 import health_pb2

from gateway.errors import NotFound, shown
from gateway.protocol import INFERENCE_SERVICE
from gateway.server.readiness import Readiness
from gateway.server.rpc import Call, Method, methods_of
from gateway.upstream.fleet import Fleet

SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
KNOWN_SERVICES = ("", INFERENCE_SERVICE)


class HealthService:
    """SERVING while a backend is healthy and the gateway is not draining (`readiness`)."""

    def __init__(self, fleet: Fleet, readiness: Readiness | None = None) -> None:
        self._fleet = fleet
        self._readiness = readiness if readiness is not None else Readiness()
        self._watchers: set[asyncio.Event] = set()
        fleet.on_change(self._changed)
        self._readiness.on_change(self._changed)

    def __repr__(self) -> str:
        return f"<HealthService {'SERVING' if self.status() == SERVING else 'NOT_SERVING'} watchers={len(self._watchers)}>"

    def rebind(self, fleet: Fleet) -> None:
        """Follow another fleet (a config reload rebuilt it); watchers get the status it gives."""
        self._fleet = fleet
        fleet.on_change(self._changed)
        self._changed()

    def methods(self) -> list[Method]:
        # Watch is server-streaming; on the wire that is a stream the client half-closes after one message.
        return methods_of(SERVICE, {"Check": self.check}, {"Watch": self.watch})

    def status(self) -> int:
        if self._readiness.draining:
            return NOT_SERVING
        return SERVING if any(b.healthy for b in self._fleet.backends()) else NOT_SERVING

    def _changed(self) -> None:
        for event in self._watchers:
            event.set()

    async def check(self, raw: bytes, call: Call) -> bytes:
        request = health_pb2.HealthCheckRequest.FromString(raw)
        if request.service not in KNOWN_SERVICES:
            raise NotFound(f"unknown service {shown(request.service)!r}; expected '' or '{INFERENCE_SERVICE}'")
        return health_pb2.HealthCheckResponse(status=self.status()).SerializeToString()

    async def watch(self, requests: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
        raw = b""
        async for raw in requests:
            break
        request = health_pb2.HealthCheckRequest.FromString(raw)
        if request.service not in KNOWN_SERVICES:  # the protocol: say so, and keep watching
            yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN).SerializeToString()
            await asyncio.Event().wait()
        event = asyncio.Event()
        self._watchers.add(event)
        try:
            sent = None
            while True:
                status = self.status()
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status).SerializeToString()
                    sent = status
                await event.wait()
                event.clear()
        finally:
            self._watchers.discard(event)
