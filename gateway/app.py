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
from pathlib import Path

import grpc

from gateway.server.model_statistics import GatewayCounts

from gateway.admin.deploy_service import SERVICE as DEPLOY_SERVICE
from gateway.admin.deploy_service import DeployService
from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import DriftService
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import GatewayService
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.config import GatewayConfig, config_from_mapping
from gateway.drift.stage import DriftStage
from gateway.pipeline.admission import Admission
from gateway.pipeline.core import Pipeline
from gateway.protocol import INFERENCE_SERVICE
from gateway.routing.dispatcher import DirectDispatcher
from gateway.routing.hedging import Hedging
from gateway.routing.retry_budget import RetryBudget
from gateway.routing.mirror import Mirror
from gateway.rollout.controller import RolloutController
from gateway.routing.router import Router
from gateway.routing.sequences import SequenceTable
from gateway.security.guard import Guard
from gateway.server.access import guarded
from gateway.server.config import ServerTls
from gateway.server.engines.grpcio import GrpcioEngine
from gateway.server.health import SERVICE as HEALTH_SERVICE
from gateway.server.health import HealthService
from gateway.server.inference import InferenceService
from gateway.server.reflection import ReflectionService
from gateway.telemetry.stage import GatewayView, TelemetryStage
from gateway.traffic.stage import TrafficStage
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.fleet import Fleet
from gateway.workers.link import WorkerLink
from gateway.workers.report import BackendGauge, BatchedGauge, WorkerReport
from gateway.workers.role import WorkerRole

log = logging.getLogger(__name__)


class Gateway:
    """tensorgate: every stage of a Triton-compatible gRPC gateway, built from one config.

    `start_stages()` / `stop_stages()` run what serving needs besides a front door (backend health
    checks, drift, telemetry); `methods()` is every gRPC method, for an engine to serve. `start()`
    and `stop()` do both with the grpc.aio engine, in this process; `EnvoyGateway` serves the same
    stages from inside Envoy's process. Construct it inside the event loop that will serve it:
    grpc.aio channels bind to that loop.
    """

    def __init__(self, config: GatewayConfig, worker: WorkerRole | None = None) -> None:
        """`worker`: this gateway is one worker of several (gateway/workers/): it serves with
        SO_REUSEPORT, ships its counters and drift rows to its parent's hub, and answers
        ModelStatistics, the admin snapshot and drift calls with the merged view."""
        self.config = config
        self.worker = worker
        self.link = WorkerLink(worker) if worker is not None else None
        self.fleet = Fleet(config.pools, config.upstream, config.health, config.outlier)
        self.catalog = ModelCatalog(self.fleet)
        self.router = Router(
            self.fleet, config.models, config=config.routing,
            pool_costs={name: pool.cost for name, pool in config.pools.items()},
        )
        self.sequences = SequenceTable()
        routing = config.routing
        self.direct = DirectDispatcher(
            self.router, self.sequences, routing.retry_unavailable,
            probes=Mirror(routing.probe_max_in_flight), max_attempts=routing.max_attempts,
            budget=RetryBudget(routing.retry_budget_ratio, routing.retry_budget_min_per_s),
            hedging=Hedging(routing.hedge_min_delay_ms / 1e3) if routing.hedge_after_p95 else None,
        )
        self.batching = BatchingDispatcher(self.direct, config.batching, self.router)
        self.pipeline = Pipeline(self.catalog, self.router.routes, self.batching, Admission(config.admission))
        self.traffic = TrafficStage(self.router, config.models)
        self.pipeline.version_pickers = self.traffic.pickers  # the same dict: a new split applies at once
        self.pipeline.attach(observer=self.traffic.observer)
        self.fleet.on_change(self.pipeline.forget_unversioned)
        self.drift = DriftStage(config.drift, forward=self.link.forward_drift if self.link is not None else None)
        self.rollouts = RolloutController(config.rollout, self.traffic, self.router, self.fleet,
                                          on_live=self.drift.serving_version)
        self.pipeline.attach(observer=self.rollouts.observer)
        if self.drift.monitors:
            self.pipeline.attach(observer=self.drift.observer)
        self.telemetry = (TelemetryStage(config.telemetry, self._view(), export_metrics=self.link is None)
                          if config.telemetry.enabled else None)
        if self.telemetry is not None:
            self.pipeline.attach(observer=self.telemetry.observer, refusal_observer=self.telemetry.refusal_observer)
            self.drift.hooks.append(self.telemetry.drift_hook)
            tracing = self.telemetry.tracing
            if tracing is not None:
                self.pipeline.attach(observer=tracing.observer, trace_starter=tracing.start)
                self.direct.traced_send = tracing.send
        self.guard = Guard.from_config(config.auth, config.limits)  # None: nothing to check, no call pays
        self.inference = InferenceService(self.pipeline, self.fleet, server_name=config.server.name, guard=self.guard,
                                          peer_counts=self.link.peer_counts if self.link is not None else None)
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
            resilience=self._resilience_counts,
            shadow_copies=self.traffic.shadow_copies,
            service_times=self.router.service_times,
        )

    def _resilience_counts(self) -> dict:
        direct, outliers = self.direct, self.fleet.outliers
        return {
            "retries": {"retry": direct.retries, "failover": direct.failovers, "refused": direct.retries_refused,
                        "hedge": direct.hedges},
            "ejections": {**outliers.ejections_by_reason, "refused_by_cap": outliers.ejections_refused,
                          "readmission": outliers.readmissions},
            "shed": self.pipeline.admission.shed(),
        }

    def methods(self) -> list:
        """Every gRPC method the gateway serves, on whichever engine."""
        services = [INFERENCE_SERVICE, DRIFT_SERVICE, GATEWAY_SERVICE, DEPLOY_SERVICE, HEALTH_SERVICE]
        drift = DriftService(self.drift).methods()
        snapshot = self.snapshot
        if self.link is not None:  # the drift windows and the merged state live in the parent's hub
            drift = self.link.proxy(drift)
            snapshot = self._merged_snapshot
        methods = [
            *self.inference.methods(),
            *drift,
            *GatewayService(snapshot, self.traffic).methods(),
            # Rollouts run in one process; with workers each would run its own: refused there (deploy_service.py).
            *DeployService(self.rollouts if self.link is None else None).methods(),
            *self.health.methods(),
            *ReflectionService(services).methods(),
        ]
        return guarded(methods, self.guard, admin_services=(DRIFT_SERVICE, GATEWAY_SERVICE))

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start_stages(self) -> None:
        """Warm the drift kernels, start telemetry, check every backend once, sweep idle sequences."""
        if self.drift.monitors:
            await self.drift.start()
        await self.traffic.start()
        if self.telemetry is not None:
            self.telemetry.start()
        await self.fleet.start()
        await self.rollouts.start()  # after the fleet: a resumed rollout needs the backends' health
        self._sweeper = asyncio.ensure_future(self._sweep_sequences())
        if self.link is not None:
            await self.link.start(self._report)

    async def stop_stages(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.rollouts.close()
        await self.batching.close()
        await self.traffic.close()
        await self.direct.probes.close()
        await self.drift.close()
        if self.link is not None:
            await self.link.close()  # the last report: this worker's final counts
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)  # a final OTLP export may wait on the network
        await self.fleet.close()

    async def start(self) -> "Gateway":
        """Start the stages and serve them with the grpc.aio engine on config.listen (port 0 picks one)."""
        server = self.config.server
        engine = GrpcioEngine(
            self.config.listen, self.methods(),
            max_receive_bytes=server.max_message_bytes,
            max_send_bytes=self.config.upstream.max_message_bytes,
            reuse_port=self.worker is not None,
            credentials=None if server.tls is None else server_credentials(server.tls),
            max_concurrent_streams=server.max_concurrent_streams,
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
        """Live state for people and tests: backends (health: healthy, unhealthy, unknown, or
        draining after leaving DNS), DNS discovery per pool, routing decisions, placement (per model
        version and pool: gate, service time, predicted latency), traffic (splits, per-version
        counters, shadows), batching per model."""
        return {
            "backends": {
                b.address: {"pool": b.pool, "health": b.health.value, "detail": b.health_detail,
                            "outstanding": b.outstanding, "served": b.served, "failed": b.failed,
                            "ejected": b.ejected}
                for b in self.fleet.backends()
            },
            "discovery": {
                pool: {"dns": d.target, "resolutions": d.resolutions, "failures": d.failures, "last_error": d.last_error}
                for pool, d in self.fleet.discovery.items()
            },
            "routing": {f"{pool}/{reason}": count for (pool, reason), count in sorted(self.router.decisions.items())},
            "placement": self.router.placement(),
            "probes": self.direct.probes.statistics(),
            "traffic": self.traffic.snapshot(),
            "sequences": len(self.sequences),
            "resilience": {
                "outliers": self.fleet.outliers.snapshot(),
                "retries": self.direct.retries, "failovers": self.direct.failovers, "hedges": self.direct.hedges,
                "retries_refused": self.direct.retries_refused,
                "admission": self.pipeline.admission.snapshot(),
            },
            "batching": self.batching.snapshot(),
            "drift": {model: repr(monitor) for model, monitor in self.drift.monitors.items()},
            "tenants": {} if self.guard is None else self.guard.snapshot(),
        }

    async def _merged_snapshot(self) -> dict:
        return await self.link.merged_snapshot(self.snapshot())

    def _report(self) -> WorkerReport:
        """What this worker ships to its parent's hub (gateway/workers/report.py)."""
        report = WorkerReport(self.worker.worker_id, os.getpid(), sequences=len(self.sequences))
        report.routing = dict(self.router.decisions)
        report.backends = [BackendGauge(b.address, b.pool, b.healthy, b.outstanding, b.health.value,
                                        b.health_detail, b.served, b.failed) for b in self.fleet.backends()]
        report.batching = [BatchedGauge(name, version, dict(counters.batch_sizes), waiting)
                           for name, version, counters, waiting in self.batching.batched_models()]
        for entry in self.pipeline.entries():
            own, batched = entry.counters, self.batching.batch_counters(entry.name, entry.version)
            report.counts[(entry.name, entry.version)] = GatewayCounts(
                own.success_count, own.success_ns, own.fail_count, own.fail_ns, own.last_inference_ms,
                batched.requests if batched is not None else 0,
                int(batched.queue_delay_s_total * 1e9) if batched is not None else 0)
        report.snapshot = {"batching": self.batching.snapshot()}
        if self.telemetry is not None:
            aggregates = self.telemetry.aggregates
            report.requests = aggregates.snapshot()
            report.backend_time = aggregates.backend_time.snapshot()
            report.queue_time = aggregates.queue_time.snapshot()
        return report

    async def wait(self) -> None:
        if self._engine is not None:
            await self._engine.wait()

    async def __aenter__(self) -> "Gateway":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop(grace=0)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """The grpc.aio engine's TLS: the gateway's certificate, and client certificates verified
    against client_ca_file when it is given (mutual TLS)."""

    def contents(path: str) -> bytes:
        with open(path, "rb") as stream:
            return stream.read()

    return grpc.ssl_server_credentials(
        [(contents(tls.key_file), contents(tls.cert_file))],
        root_certificates=None if tls.client_ca_file is None else contents(tls.client_ca_file),
        require_client_auth=tls.mutual and tls.require_client_certificate,
    )


@contextlib.asynccontextmanager
async def envoy_services(config_json: str):
    """The envoy engine's services factory (gateway/server/engines/envoy.py): inside Envoy's process,
    on its event loop, build the Gateway from its config (the JSON of the config mapping), start its
    stages, serve its Methods, and stop the stages when Envoy shuts down."""
    gateway = Gateway(config_from_mapping(json.loads(config_json)), worker=WorkerRole.from_environment())
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

    def __init__(self, config: GatewayConfig, mapping: dict, stderr=None, worker: WorkerRole | None = None) -> None:
        """`mapping` is the config as read (YAML or a dict), which the Envoy process loads again;
        `stderr`: where the Envoy process's standard error goes (a file; None: this process's);
        `worker`: one worker of several (Envoy listens with reuse_port; its gateway reports to the hub)."""
        from gateway.server.engines.envoy_server import EnvoyEngine, EnvoyOptions

        self.config = config
        mapping = {**mapping, "listen": config.listen}
        server = config.server
        tls = server.tls
        options = EnvoyOptions(
            envoy_threads=server.envoy_threads, drain_s=max(1.0, server.grace_s),
            max_concurrent_streams=server.max_concurrent_streams,
            initial_stream_window_bytes=server.http2_stream_window_bytes,
            initial_connection_window_bytes=server.http2_connection_window_bytes,
            # Paths, not contents: Envoy reads the files itself and the key never enters its config.
            tls_cert=None if tls is None else Path(tls.cert_file),
            tls_key=None if tls is None else Path(tls.key_file),
            tls_client_ca=None if tls is None or tls.client_ca_file is None else Path(tls.client_ca_file),
            require_client_certificate=True if tls is None else tls.require_client_certificate,
            reuse_port=worker is not None,
        )
        self.engine = EnvoyEngine(
            config.listen, "gateway.app:envoy_services", argument=json.dumps(mapping),
            max_receive_bytes=server.max_message_bytes, options=options, stderr=stderr,
            env=worker.environment() if worker is not None else None,
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


def serving_gateway(config: GatewayConfig, mapping: dict, envoy_stderr=None,
                    worker: WorkerRole | None = None) -> "Gateway | EnvoyGateway":
    """The gateway on the engine its config names (`server.engine`); `envoy_stderr`: where the
    Envoy process's standard error goes on the envoy engine (a file; None: this process's);
    `worker`: this process is one worker of several (gateway/workers/)."""
    if config.server.resolved_engine() == "envoy":
        return EnvoyGateway(config, mapping, stderr=envoy_stderr, worker=worker)
    return Gateway(config, worker=worker)
