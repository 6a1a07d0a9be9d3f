"""The gateway as one object: builds every stage from the config, starts and stops them in order."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import DriftService
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.config import GatewayConfig
from gateway.drift.stage import DriftStage
from gateway.protocol import INFERENCE_SERVICE, POOL
from gateway.routing.router import Router
from gateway.routing.sequences import SequenceTable
from gateway.server.inference import InferenceService
from gateway.server.pipeline import DirectDispatcher, Pipeline
from gateway.telemetry.stage import TelemetryStage
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.fleet import Fleet

log = logging.getLogger(__name__)


class Gateway:
    """tensorgate: a Triton-compatible gRPC server in front of pools of Triton backends.

    `await Gateway(config).start()` binds the port (config.listen; port 0 picks one, see `address`),
    checks every backend once, and serves; `await gateway.stop()` drains in-flight requests.
    Construct it inside the event loop that will serve it: grpc.aio channels bind to that loop.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.fleet = Fleet(config.pools, config.upstream, config.health)
        self.catalog = ModelCatalog(self.fleet)
        self.router = Router(self.fleet, config.models)
        self.sequences = SequenceTable()
        self.direct = DirectDispatcher(self.router, self.sequences, config.routing.retry_unavailable)
        self.batching = BatchingDispatcher(self.direct, config.batching, self.router)
        self.pipeline = Pipeline(self.catalog, self.router, self.batching)
        self.fleet.on_change(self.pipeline.forget_unversioned)
        self.drift = DriftStage(config.drift)
        if self.drift.monitors:
            self.pipeline.observers.append(self.drift.observer)
        self.telemetry = TelemetryStage(config.telemetry, self) if config.telemetry.enabled else None
        if self.telemetry is not None:
            self.pipeline.observers.append(self.telemetry.observer)
            self.pipeline.refusal_observers.append(self.telemetry.refusal_observer)
            self.drift.hooks.append(self.telemetry.drift_hook)
            tracing = self.telemetry.tracing
            if tracing is not None:
                self.pipeline.trace_starter = tracing.start
                self.direct.traced_send = tracing.send
                self.pipeline.observers.append(tracing.observer)
        self.inference = InferenceService(self.pipeline, self.fleet, self.catalog, server_name=config.server.name)
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        state = f"serving on {self.address}" if self._server else "stopped"
        return f"<Gateway {state} {self.fleet!r} {self.sequences!r}>"

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> "Gateway":
        limit = self.config.server.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", self.config.upstream.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((self.inference.handler(), DriftService(self.drift).handler()))
        health_servicer = _HealthServicer(self.fleet)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, DRIFT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
            pool=POOL,
        )
        self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        if self.drift.monitors:
            await self.drift.start()
        if self.telemetry is not None:
            self.telemetry.start()
        await self.fleet.start()
        await server.start()
        self._server = server
        self._sweeper = asyncio.ensure_future(self._sweep_sequences())
        log.info("tensorgate serving on %s; %r", self.address, self.fleet)
        return self

    async def _sweep_sequences(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sequences.expire()

    async def stop(self, grace: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.stop(self.config.server.grace_s if grace is None else grace)
            self._server = None
        await self.batching.close()
        await self.drift.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)  # a final OTLP export may wait on the network
        await self.fleet.close()

    def statistics(self) -> dict:
        """Live state for people and tests: backends, routing decisions, batching per model."""
        return {
            "backends": {
                b.address: {"pool": b.pool, "health": b.health.value, "outstanding": b.outstanding,
                            "served": b.served, "failed": b.failed}
                for b in self.fleet.backends()
            },
            "routing": {f"{pool}/{reason}": count for (pool, reason), count in sorted(self.router.decisions.items())},
            "sequences": len(self.sequences),
            "batching": self.batching.statistics(),
            "drift": {model: repr(monitor) for model, monitor in self.drift.monitors.items()},
        }

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> "Gateway":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop(grace=0)


class _HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING while at least one backend is healthy ('' or the inference service)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def Check(self, request, context):
        if request.service not in ("", INFERENCE_SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = any(b.healthy for b in self._fleet.backends())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
