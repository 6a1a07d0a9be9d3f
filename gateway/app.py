"""The gateway as one object: builds every stage from the config, wires them, starts and stops them.

This is the only module that knows every stage. Each stage gets what it may read (the telemetry
stage a GatewayView of functions; the pipeline a `routes` predicate), never the Gateway itself.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import DriftService
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.config import GatewayConfig
from gateway.drift.stage import DriftStage
from gateway.pipeline.core import Pipeline
from gateway.protocol import INFERENCE_SERVICE
from gateway.routing.dispatcher import DirectDispatcher
from gateway.routing.router import Router
from gateway.routing.sequences import SequenceTable
from gateway.server.engines.grpcio import GrpcioEngine
from gateway.server.health import SERVICE as HEALTH_SERVICE
from gateway.server.health import HealthService
from gateway.server.inference import InferenceService
from gateway.server.reflection import ReflectionService
from gateway.telemetry.stage import GatewayView, TelemetryStage
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
        self.pipeline = Pipeline(self.catalog, self.router.routes, self.batching)
        self.fleet.on_change(self.pipeline.forget_unversioned)
        self.drift = DriftStage(config.drift)
        if self.drift.monitors:
            self.pipeline.attach(observer=self.drift.observer)
        self.telemetry = TelemetryStage(config.telemetry, self._view()) if config.telemetry.enabled else None
        if self.telemetry is not None:
            self.pipeline.attach(observer=self.telemetry.observer, refusal_observer=self.telemetry.refusal_observer)
            self.drift.hooks.append(self.telemetry.drift_hook)
            tracing = self.telemetry.tracing
            if tracing is not None:
                self.pipeline.attach(observer=tracing.observer, trace_starter=tracing.start)
                self.direct.traced_send = tracing.send
        self.inference = InferenceService(self.pipeline, self.fleet, server_name=config.server.name)
        self.health = HealthService(self.fleet)
        self._engine: GrpcioEngine | None = None
        self._sweeper: asyncio.Task | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        state = f"serving on {self.address}" if self._engine else "stopped"
        return f"<Gateway {state} {self.fleet!r} {self.sequences!r}>"

    def _view(self) -> GatewayView:
        """What telemetry reads of the other stages."""
        return GatewayView(
            backends=self.fleet.backends,
            known_models=self.fleet.known_models,
            routes=self.router.routes,
            routing_decisions=lambda: self.router.decisions,
            batched_models=self.batching.batched_models,
            drift_monitors=lambda: self.drift.monitors,
        )

    def methods(self) -> list:
        """Every gRPC method the gateway serves, on whichever engine."""
        services = [INFERENCE_SERVICE, DRIFT_SERVICE, HEALTH_SERVICE]
        return [
            *self.inference.methods(),
            *DriftService(self.drift).methods(),
            *self.health.methods(),
            *ReflectionService(services).methods(),
        ]

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> "Gateway":
        engine = GrpcioEngine(
            self.config.listen, self.methods(),
            max_receive_bytes=self.config.server.max_message_bytes,
            max_send_bytes=self.config.upstream.max_message_bytes,
        )
        if self.drift.monitors:
            await self.drift.start()
        if self.telemetry is not None:
            self.telemetry.start()
        await self.fleet.start()
        self.port = await engine.start()
        self._engine = engine
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
        if self._engine is not None:
            await self._engine.stop(self.config.server.grace_s if grace is None else grace)
            self._engine = None
        await self.batching.close()
        await self.drift.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)  # a final OTLP export may wait on the network
        await self.fleet.close()

    def snapshot(self) -> dict:
        """Live state for people and tests: backends, routing decisions, batching per model."""
        return {
            "backends": {
                b.address: {"pool": b.pool, "health": b.health.value, "detail": b.health_detail,
                            "outstanding": b.outstanding, "served": b.served, "failed": b.failed}
                for b in self.fleet.backends()
            },
            "routing": {f"{pool}/{reason}": count for (pool, reason), count in sorted(self.router.decisions.items())},
            "sequences": len(self.sequences),
            "batching": self.batching.snapshot(),
            "drift": {model: repr(monitor) for model, monitor in self.drift.monitors.items()},
        }

    async def wait(self) -> None:
        if self._engine is not None:
            await self._engine.wait()

    async def __aenter__(self) -> "Gateway":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop(grace=0)
