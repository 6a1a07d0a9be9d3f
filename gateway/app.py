"""The gateway as one object: builds every stage from the config, wires them, starts and stops them.

This is the only module that knows every stage. Each stage gets what it may read (the telemetry
stage a GatewayView of functions; the pipeline a `routes` predicate), never the Gateway itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import DriftService
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import GatewayService
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.config import GatewayConfig, config_from_mapping
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
    """tensorgate: every stage of a Triton-compatible gRPC gateway, built from one config.

    `start_stages()` / `stop_stages()` run what serving needs besides a front door (backend health
    checks, drift, telemetry); `methods()` is every gRPC method, for an engine to serve. `start()`
    and `stop()` do both with the grpc.aio engine, in this process; `EnvoyGateway` serves the same
    stages from inside Envoy's process. Construct it inside the event loop that will serve it:
    grpc.aio channels bind to that loop.
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
        services = [INFERENCE_SERVICE, DRIFT_SERVICE, GATEWAY_SERVICE, HEALTH_SERVICE]
        methods = [
            *self.inference.methods(),
            *DriftService(self.drift).methods(),
            *GatewayService(self.snapshot).methods(),
            *self.health.methods(),
        ]
        if self.config.server.reflection:  # off by default: it maps the admin API for anyone (ServerConfig)
            methods += ReflectionService(services).methods()
        return methods

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start_stages(self) -> None:
        """Warm the drift kernels, start telemetry, check every backend once, sweep idle sequences."""
        if self.drift.monitors:
            await self.drift.start()
        if self.telemetry is not None:
            self.telemetry.start()
        await self.fleet.start()
        self._sweeper = asyncio.ensure_future(self._sweep_sequences())

    async def stop_stages(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.batching.close()
        await self.drift.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)  # a final OTLP export may wait on the network
        await self.fleet.close()

    async def start(self) -> "Gateway":
        """Start the stages and serve them with the grpc.aio engine on config.listen (port 0 picks one)."""
        engine = GrpcioEngine(
            self.config.listen, self.methods(),
            max_receive_bytes=self.config.server.max_message_bytes,
            max_send_bytes=self.config.upstream.max_message_bytes,
            max_pending_calls=self.config.server.max_pending_calls,
        )
        await self.start_stages()
        self.port = await engine.start()
        self._engine = engine
        log.info("tensorgate serving on %s (grpcio engine); %r", self.address, self.fleet)
        return self

    async def _sweep_sequences(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sequences.expire()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (calls in flight get `grace` seconds, server.grace_s by default), then the stages."""
        if self._engine is not None:
            await self._engine.stop(self.config.server.grace_s if grace is None else grace)
            self._engine = None
        await self.stop_stages()

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


@contextlib.asynccontextmanager
async def envoy_services(config_json: str):
    """The envoy engine's services factory (gateway/server/engines/envoy.py): inside Envoy's process,
    on its event loop, build the Gateway from its config (the JSON of the config mapping), start its
    stages, serve its Methods, and stop the stages when Envoy shuts down."""
    gateway = Gateway(config_from_mapping(json.loads(config_json)))
    await gateway.start_stages()
    log.info("tensorgate stages ready in Envoy (pid %d); %r", os.getpid(), gateway.fleet)
    try:
        yield gateway.methods()
    finally:
        await gateway.stop_stages()


class EnvoyGateway:
    """The gateway served by the envoy engine: Envoy's HTTP/2 front door with the gateway's stages
    running inside the Envoy process (`envoy_services`). Same shape as Gateway's serving half:
    `start()`, `address`, `stop(grace)`, `wait()`; its live state is the admin GetSnapshot."""

    def __init__(self, config: GatewayConfig, mapping: dict, stderr=None) -> None:
        """`mapping` is the config as read (YAML or a dict), which the Envoy process loads again;
        `stderr`: where the Envoy process's standard error goes (a file; None: this process's)."""
        from gateway.server.engines.envoy_server import EnvoyEngine, EnvoyOptions

        self.config = config
        mapping = {**mapping, "listen": config.listen}
        server = config.server
        self.engine = EnvoyEngine(
            config.listen, "gateway.app:envoy_services", argument=json.dumps(mapping),
            max_receive_bytes=server.max_message_bytes,
            options=EnvoyOptions(envoy_threads=server.envoy_threads, drain_s=max(1.0, server.grace_s)),
            stderr=stderr,
        )
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"<EnvoyGateway {self.engine!r}>"

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self) -> "EnvoyGateway":
        self.port = await self.engine.start()
        log.info("tensorgate serving on %s (envoy engine, pid %s)", self.address, self.engine.pid)
        return self

    async def stop(self, grace: float | None = None) -> None:
        await self.engine.stop(self.config.server.grace_s if grace is None else grace)

    async def wait(self) -> None:
        await self.engine.wait()


def serving_gateway(config: GatewayConfig, mapping: dict, envoy_stderr=None) -> "Gateway | EnvoyGateway":
    """The gateway on the engine its config names (`server.engine`); `envoy_stderr`: where the
    Envoy process's standard error goes on the envoy engine (a file; None: this process's)."""
    if config.server.resolved_engine() == "envoy":
        return EnvoyGateway(config, mapping, stderr=envoy_stderr)
    return Gateway(config)
