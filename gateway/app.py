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
import shutil
import tempfile
from pathlib import Path

import grpc

from gateway.server import gc_policy, interpreter
from gateway.server.model_statistics import GatewayCounts

from gateway.admin.control import ControlError, send_control, serve_control
from gateway.admin.deploy_service import SERVICE as DEPLOY_SERVICE
from gateway.admin.deploy_service import DeployService
from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import DriftService
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import GatewayService
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.config import GatewayConfig, config_from_mapping, file_digest, load_config, parse_config_text, plan_reload
from gateway.errors import ConfigError
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
from gateway.server.engines.h2 import H2Engine
from gateway.server.health import SERVICE as HEALTH_SERVICE
from gateway.server.health import HealthService
from gateway.server.inference import InferenceService
from gateway.server.readiness import Readiness
from gateway.server.reflection import ReflectionService
from gateway.telemetry.stage import GatewayView, TelemetryStage
from gateway.traffic.stage import TrafficStage
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.fleet import Fleet
from gateway.workers.link import WorkerLink
from gateway.workers.report import BackendGauge, BatchedGauge, WorkerReport
from gateway.workers.role import WorkerRole

log = logging.getLogger(__name__)

#: A drain stops admitting requests once none has arrived for this long (load balancers have seen
#: NOT_SERVING), and checks on the work in flight this often.
DRAIN_QUIET_S = 0.25
DRAIN_POLL_S = 0.02
#: What a reload replaced is closed when its last request is done, after at most this long (or
#: server.grace_s when longer).
RETIRE_MIN_S = 30.0


class _Core:
    """What a config reload rebuilds: the backends and everything that holds them."""

    __slots__ = ("fleet", "catalog", "router", "direct", "batching", "pipeline", "traffic")

    def __init__(self, fleet, catalog, router, direct, batching, pipeline, traffic) -> None:
        self.fleet, self.catalog, self.router = fleet, catalog, router
        self.direct, self.batching, self.pipeline, self.traffic = direct, batching, pipeline, traffic


#: How long one stage may take to stop before the gateway stops without it (a warning names it).
STAGE_STOP_S = 5.0


async def _bounded(what: str, closing, limit_s: float | None = None) -> None:
    """Await `closing` for at most `limit_s` (STAGE_STOP_S); past that, cancel it without waiting on
    the cancellation (what did not finish in time may not finish being cancelled either) and say
    which stage it was."""
    limit_s = STAGE_STOP_S if limit_s is None else limit_s
    task = asyncio.ensure_future(closing)
    done, _ = await asyncio.wait((task,), timeout=limit_s)
    if not done:
        task.cancel()
        log.warning("stopping %s took more than %g s; the gateway stops without waiting for it", what, limit_s)
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("stopping %s failed: %r", what, task.exception())


class Gateway:
    """tensorgate: every stage of a Triton-compatible gRPC gateway, built from one config.

    `start_stages()` / `stop_stages()` run what serving needs besides a front door (backend health
    checks, drift, telemetry, the config file watch); `methods()` is every gRPC method, for an
    engine to serve. `start()` and `stop()` do both with an in-process engine (grpc.aio, or h2);
    `EnvoyGateway` serves the same stages from inside Envoy's process. `drain()` takes the gateway
    out of rotation and lets its work finish (SIGTERM); `reload()` applies a new config without
    dropping a request (SIGHUP, the admin ReloadConfig, a changed config file; gateway/reload.py
    says what is applied live and what waits for a restart). Construct it inside the event loop
    that will serve it: grpc.aio channels bind to that loop.
    """

    def __init__(self, config: GatewayConfig, worker: WorkerRole | None = None, config_path: str | None = None) -> None:
        """`worker`: this gateway is one worker of several (gateway/workers/): it serves with
        SO_REUSEPORT, ships its counters and drift rows to its parent's hub, and answers
        ModelStatistics, the admin snapshot and drift calls with the merged view. `config_path`: the
        YAML file the config came from: reloads read it again, and it is watched for changes."""
        self.config = config
        self.config_path = config_path
        self.worker = worker
        self.link = WorkerLink(worker) if worker is not None else None
        self.readiness = Readiness()
        self.sequences = SequenceTable()
        self.drift = self._drift_stage(config)
        self.telemetry = (TelemetryStage(config.telemetry, self._view(), export_metrics=self.link is None)
                          if config.telemetry.enabled else None)
        if self.telemetry is not None:
            self.drift.hooks.append(self.telemetry.drift_hook)
        # Gated rollouts: one controller for the gateway's life, reading the stages a reload replaces
        # through the current core; told first, so each core's pipeline reports to it.
        self.rollouts = RolloutController(config.rollout, lambda: self._core,
                                          on_live=lambda *live: self.drift.serving_version(*live))
        self._install(self._build_core(config))
        self.guard = Guard.from_config(config.auth, config.limits)  # None: nothing to check, no call pays
        self.inference = InferenceService(self.pipeline, self.fleet, server_name=config.server.name, guard=self.guard,
                                          peer_counts=self.link.peer_counts if self.link is not None else None,
                                          readiness=self.readiness)
        self.health = HealthService(self.fleet, self.readiness)
        self.drift_service = DriftService(self.drift)
        self._engine: GrpcioEngine | H2Engine | None = None
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self.reloads = 0
        self.port: int | None = None

    def __repr__(self) -> str:
        state = f"serving on {self.address}" if self._engine else "stopped"
        return f"<Gateway {state} {self.readiness!r} {self.fleet!r} {self.sequences!r}>"

    def _drift_stage(self, config: GatewayConfig) -> DriftStage:
        return DriftStage(config.drift, forward=self.link.forward_drift if self.link is not None else None)

    def _build_core(self, config: GatewayConfig) -> _Core:
        """The backends and the stages that hold them, wired to the drift and telemetry stages."""
        fleet = Fleet(config.pools, config.upstream, config.health, config.outlier)
        catalog = ModelCatalog(fleet)
        router = Router(fleet, config.models, config=config.routing,
                        pool_costs={name: pool.cost for name, pool in config.pools.items()})
        routing = config.routing
        direct = DirectDispatcher(
            router, self.sequences, routing.retry_unavailable,
            probes=Mirror(routing.probe_max_in_flight), max_attempts=routing.max_attempts,
            budget=RetryBudget(routing.retry_budget_ratio, routing.retry_budget_min_per_s),
            hedging=Hedging(routing.hedge_min_delay_ms / 1e3) if routing.hedge_after_p95 else None,
        )
        batching = BatchingDispatcher(direct, config.batching, router)
        pipeline = Pipeline(catalog, router.routes, batching, Admission(config.admission))
        traffic = TrafficStage(router, config.models)
        pipeline.version_pickers = traffic.pickers  # the same dict: a new split applies at once
        pipeline.attach(observer=traffic.observer)
        pipeline.attach(observer=self.rollouts.observer)
        fleet.on_change(pipeline.forget_unversioned)
        if self.drift.monitors:
            pipeline.attach(observer=self.drift.observer, batch_observer=self.drift.batch_observer)
        if self.telemetry is not None:
            pipeline.attach(observer=self.telemetry.observer, refusal_observer=self.telemetry.refusal_observer)
            tracing = self.telemetry.tracing
            if tracing is not None:
                pipeline.attach(observer=tracing.observer, trace_starter=tracing.start)
                direct.traced_send = tracing.send
        return _Core(fleet, catalog, router, direct, batching, pipeline, traffic)

    def _install(self, core: _Core) -> None:
        self._core = core
        self.fleet, self.catalog, self.router = core.fleet, core.catalog, core.router
        self.direct, self.batching, self.pipeline = core.direct, core.batching, core.pipeline
        self.traffic = core.traffic

    def _view(self) -> GatewayView:
        """What telemetry reads of the other stages (through `self`: a reload replaces them)."""
        return GatewayView(
            backends=lambda: self.fleet.backends(),
            known_models=lambda: self.fleet.known_models(),
            routes=lambda model: self.router.routes(model),
            routing_decisions=lambda: self.router.decisions,
            batched_models=lambda: self.batching.batched_models(),
            drift_monitors=lambda: self.drift.monitors,
            resilience=self._resilience_counts,
            shadow_copies=lambda: self.traffic.shadow_copies(),
            service_times=lambda: self.router.service_times(),
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
        drift = self.drift_service.methods()
        snapshot = self.snapshot
        if self.link is not None:  # the drift windows and the merged state live in the parent's hub
            drift = self.link.proxy(drift)
            snapshot = self._merged_snapshot
        methods = [
            *self.inference.methods(),
            *drift,
            *GatewayService(snapshot, lambda: self.traffic, self.reload_text).methods(),
            # Rollouts run in one process; with workers each would run its own: refused there (deploy_service.py).
            *DeployService(self.rollouts if self.link is None else None).methods(),
            *self.health.methods(),
        ]
        if self.config.server.reflection:  # off by default: it maps the admin API for anyone (ServerConfig)
            methods += ReflectionService(services).methods()
        return guarded(methods, self.guard, admin_services=(DRIFT_SERVICE, GATEWAY_SERVICE))

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start_stages(self) -> None:
        """Warm the drift kernels, start telemetry, check every backend once, sweep idle sequences,
        watch the config file."""
        if self.drift.monitors:
            await self.drift.start()
        await self.traffic.start()
        if self.telemetry is not None:
            self.telemetry.start()
        await self.fleet.start()
        if self.link is None:  # after the fleet: a resumed rollout needs the backends' health
            await self.rollouts.start()
        self._sweeper = asyncio.ensure_future(self._sweep_sequences())
        if self.config_path is not None:
            self._watcher = asyncio.ensure_future(self._watch_config_file())
        if self.link is not None:
            await self.link.start(self._report)

    async def stop_stages(self) -> None:
        """Stop every stage, each within STAGE_STOP_S: a stage that does not finish is logged by name
        and left behind, so a gateway told to stop always stops (SIGTERM must not wait on, say, a
        backend channel's close that never returns)."""
        for task in (self._sweeper, self._watcher, *self._retiring):
            if task is not None:
                task.cancel()
        self._sweeper = self._watcher = None
        await _bounded("the rollouts", self.rollouts.close())
        await _bounded("batching", self.batching.close())
        await _bounded("traffic", self.traffic.close())
        await _bounded("the health probes", self.direct.probes.close())
        await _bounded("drift", self.drift.close())
        if self.link is not None:
            # The last report (this worker's final counts) may take its call's 5 s timeout.
            await _bounded("the link to the workers' parent", self.link.close(), 2 * STAGE_STOP_S)
        if self.telemetry is not None:
            # A final OTLP export may wait on the network (bounded inside: Tracing.close, the reader's 2 s).
            await _bounded("telemetry", asyncio.to_thread(self.telemetry.close), 3 * STAGE_STOP_S)
        await _bounded("the backends", self.fleet.close())

    def _front_door(self) -> "GrpcioEngine | H2Engine":
        """The in-process engine: h2 when the config names it, else grpc.aio (the envoy engine
        serves these stages from Envoy's process: EnvoyGateway)."""
        server = self.config.server
        if server.resolved_engine() == "h2":
            return H2Engine(
                self.config.listen, self.methods(),
                max_message_bytes=server.max_message_bytes,
                ssl_context=None if server.tls is None else server.tls.ssl_context(),
                max_concurrent_streams=server.max_concurrent_streams,
                stream_window_bytes=server.http2_stream_window_bytes,
                connection_window_bytes=server.http2_connection_window_bytes,
                reuse_port=self.worker is not None,
            )
        return GrpcioEngine(
            self.config.listen, self.methods(),
            max_receive_bytes=server.max_message_bytes,
            max_send_bytes=self.config.upstream.max_message_bytes,
            max_pending_calls=server.max_pending_calls,
            reuse_port=self.worker is not None,
            credentials=None if server.tls is None else server_credentials(server.tls),
            max_concurrent_streams=server.max_concurrent_streams,
        )

    async def start(self) -> "Gateway":
        """Start the stages and serve them with the in-process engine (grpc.aio, or h2 when the
        config names it) on config.listen (port 0 picks one)."""
        engine = self._front_door()
        await self.start_stages()
        self.port = await engine.start()
        self._engine = engine
        kind = "h2" if isinstance(engine, H2Engine) else "grpcio"
        log.info("tensorgate serving on %s (%s engine, %s); %r", self.address, kind, interpreter.describe(), self.fleet)
        return self

    async def _sweep_sequences(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sequences.expire()

    # ---- drain (SIGTERM) -------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Take the gateway out of rotation and let its work finish, within `grace` seconds.

        At once: health NOT_SERVING (Check and Watch), ServerReady false, so probes and load
        balancers stop sending. Requests still arriving are served while load balancers catch up,
        until none has come for DRAIN_QUIET_S, and at most half the grace; from then new requests
        are refused with UNAVAILABLE (clients retry elsewhere) and what is in flight finishes.
        Returns when nothing is in flight and no request (refused ones included) has come for
        DRAIN_QUIET_S — grpc core cancels calls it holds but has not handed over yet when the
        engine stops, so the engine stops only once they stop coming — or when the grace is spent."""
        readiness = self.readiness
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + grace
        readiness.drain()
        log.warning("draining: health NOT_SERVING; %d request(s) in flight; grace %.1f s", readiness.in_flight, grace)
        while loop.time() < started + grace / 2 and readiness.quiet_for() < DRAIN_QUIET_S:
            await asyncio.sleep(DRAIN_POLL_S)
        readiness.refuse()
        while readiness.quiet_for() < DRAIN_QUIET_S and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if readiness.in_flight:
            log.warning("drain: the grace period (%.1f s) ended with %d request(s) in flight", grace, readiness.in_flight)
        else:
            log.warning("drained in %.2f s", loop.time() - started)

    async def stop(self, grace: float | None = None) -> None:
        """Drain (calls in flight get `grace` seconds, server.grace_s by default; 0: stop at once),
        stop serving, then stop the stages."""
        grace = self.config.server.grace_s if grace is None else grace
        if self._engine is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            if grace > 0:
                await self.drain(grace)
            # grpc core cancels only what is still running when the rest of the grace is spent.
            rest = max(0.0, deadline - loop.time()) if grace > 0 else 0
            await _bounded("the front door", self._engine.stop(rest), rest + STAGE_STOP_S)
            self._engine = None
        await self.stop_stages()

    # ---- config reload (SIGHUP, admin ReloadConfig, a changed file) ----------------------------

    async def reload_text(self, text: str) -> str:
        """Reload from config text (YAML or JSON); "" reads the config file again. ConfigError for a
        config the loader refuses (the running one keeps serving)."""
        if not text:
            if self.config_path is None:
                raise ConfigError("", "this gateway was not started from a config file; send the whole config")
            return await self.reload_file()
        return await self.reload(config_from_mapping(parse_config_text(text)), source="the admin API")

    async def reload_file(self) -> str:
        """Read the config file again and apply it (ConfigError: refused, the running config stays)."""
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error("config reload from %s refused, the running config keeps serving: %s", self.config_path, error)
            raise
        return await self.reload(config, source=self.config_path)

    async def reload(self, config: GatewayConfig, source: str = "") -> str:
        """Apply `config` without dropping a request; returns what changed (gateway/reload.py).

        Backends, pools, routes, health checks, retries, batching and drift are rebuilt beside the
        running ones; new requests go to the new ones at once, requests in flight finish on the old
        ones, which are then closed. Sequences stay on their backend when it is still configured.
        """
        async with self._reload_lock:
            plan = plan_reload(self.config, config)
            for key in plan.restart:
                log.warning("config reload: %s changed; it takes effect only at the next restart", key)
            config = plan.config
            if not plan.live:
                self.config = config
                return plan.summary()
            old_core, old_drift = self._core, self.drift
            if "drift" in plan.live:
                drift = self._drift_stage(config)
                if self.telemetry is not None:
                    drift.hooks.append(self.telemetry.drift_hook)
                if drift.monitors:
                    await drift.start()
                self.drift = drift
            core = self._build_core(config) if plan.core else None
            if core is not None:
                await core.traffic.start()
                await core.fleet.start()
                by_address = {b.address: b for b in core.fleet.backends()}
                self._install(core)
                self.rollouts.reapply()  # the rollouts' splits on the new traffic stage
                self.sequences.rebind(lambda backend: by_address.get(backend.address))
                self.inference.pipeline, self.inference.fleet = core.pipeline, core.fleet
                self.health.rebind(core.fleet)
            self.inference.server_name = config.server.name
            self.drift_service.drift = self.drift
            self.config = config
            self.reloads += 1
            retire = asyncio.ensure_future(self._retire(old_core if core is not None else None,
                                                        old_drift if self.drift is not old_drift else None))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            summary = plan.summary()
            log.warning("config reloaded from %s: %s", source or "a new config", summary)
            return summary

    async def _retire(self, core: _Core | None, drift: DriftStage | None) -> None:
        """Close what a reload replaced once the requests it still serves are done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(RETIRE_MIN_S, self.config.server.grace_s)
        if core is not None:
            while core.pipeline.in_flight and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            await core.batching.close()
            await core.traffic.close()
            await core.direct.probes.close()
            await core.fleet.close()
        if drift is not None:
            await drift.close()

    async def _watch_config_file(self) -> None:
        """Reload when the config file's content changes (checked every server.config_poll_s; 0:
        not watched, until a reload sets it)."""
        seen = file_digest(self.config_path)
        while True:
            interval = self.config.server.config_poll_s
            await asyncio.sleep(interval if interval > 0 else 1.0)
            digest = file_digest(self.config_path)
            if digest is None or digest == seen:
                continue
            seen = digest
            if self.config.server.config_poll_s <= 0:  # read again: a reload during the sleep may have set it
                continue  # not watched: SIGHUP or the admin API reloads it
            try:
                await self.reload_file()
            except ConfigError:
                pass  # logged; the running config keeps serving
            except Exception:  # a watcher bug must not stop the watching
                log.exception("config reload from %s failed", self.config_path)

    def snapshot(self) -> dict:
        """Live state for people and tests: backends (health: healthy, unhealthy, unknown, or
        draining after leaving DNS; requests sent on each upstream stream), DNS discovery per pool,
        routing decisions, placement (per model version and pool: gate, service time, predicted
        latency), traffic (splits, per-version counters, shadows), batching per model."""
        return {
            "backends": {
                b.address: {"pool": b.pool, "health": b.health.value, "detail": b.health_detail,
                            "outstanding": b.outstanding, "served": b.served, "failed": b.failed,
                            "ejected": b.ejected, "streams": b.stream_requests()}
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
            "serving": {"draining": self.readiness.draining, "in_flight": self.readiness.in_flight,
                        "reloads": self.reloads, "gc": gc_policy.describe()},
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
    """The envoy engine's services factory (the app of gateway/server/engines/envoy.py calls it):
    inside Envoy's process, on its event loop, build the Gateway from its config (the JSON of the
    config mapping), start its stages, serve its Methods, and stop the stages when Envoy shuts down."""
    gateway = Gateway(config_from_mapping(json.loads(config_json)), worker=WorkerRole.from_environment(),
                      config_path=os.environ.get(ENV_CONFIG_PATH))
    await gateway.start_stages()
    gc_policy.apply(gateway.config.server)  # Envoy's process is the gateway's
    control = None
    control_path = os.environ.get(ENV_CONTROL_SOCKET)
    if control_path:
        async def drain(argument: str) -> str:
            gateway.readiness.drain()  # Envoy itself drains the connections (EnvoyEngine.stop)
            return "draining"

        async def reload(argument: str) -> str:
            return await gateway.reload_text(json.loads(argument) if argument else "")

        control = await serve_control(control_path, {"drain": drain, "reload": reload})
    log.info("tensorgate stages ready in Envoy (pid %d); %r", os.getpid(), gateway.fleet)
    try:
        yield gateway.methods()
    finally:
        if control is not None:
            control.close()
        await gateway.stop_stages()


#: What the launcher tells the gateway inside Envoy: its control socket (gateway/admin/control.py)
#: and the config file it was read from (for reloads and the file watch).
ENV_CONTROL_SOCKET = "TENSORGATE_CONTROL_SOCKET"
ENV_CONFIG_PATH = "TENSORGATE_CONFIG_PATH"


class EnvoyGateway:
    """The gateway served by the envoy engine: Envoy's HTTP/2 front door with the gateway's stages
    running inside the Envoy process (`envoy_services`). Same shape as Gateway's serving half:
    `start()`, `address`, `stop(grace)`, `wait()`; its live state is the admin GetSnapshot."""

    def __init__(self, config: GatewayConfig, mapping: dict, stderr=None, worker: WorkerRole | None = None,
                 config_path: str | None = None) -> None:
        """`mapping` is the config as read (YAML or a dict), which the Envoy process loads again;
        `stderr`: where the Envoy process's standard error goes (a file; None: this process's);
        `worker`: one worker of several (Envoy listens with reuse_port; its gateway reports to the hub);
        `config_path`: the file it came from, which the gateway in Envoy reloads and watches."""
        from gateway.server.engines.envoy_server import EnvoyEngine, EnvoyOptions

        self.config = config
        mapping = {**mapping, "listen": config.listen}
        server = config.server
        self._control_dir = tempfile.mkdtemp(prefix="tensorgate-control-")
        self.control_path = os.path.join(self._control_dir, "control.sock")
        env = {ENV_CONTROL_SOCKET: self.control_path}
        if config_path is not None:
            env[ENV_CONFIG_PATH] = os.path.abspath(config_path)
        if worker is not None:
            env.update(worker.environment())
        tls = server.tls
        options = EnvoyOptions(
            envoy_threads=server.envoy_threads, drain_s=max(1.0, server.grace_s),
            max_concurrent_streams=server.max_concurrent_streams,
            initial_stream_window_bytes=server.http2_stream_window_bytes,
            initial_connection_window_bytes=server.http2_connection_window_bytes,
            http2_codec=server.http2_codec, stats=server.envoy_stats,
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
            env=env,
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
        log.info("tensorgate serving on %s (envoy engine, pid %s, %s)", self.address, self.engine.pid,
                 interpreter.describe())
        return self

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING inside (Check, Watch, ServerReady), then Envoy's own drain
        (GOAWAY, calls in flight get `grace` seconds), then stop Envoy."""
        grace = self.config.server.grace_s if grace is None else grace
        if grace and self.engine.pid is not None:
            try:
                await send_control(self.control_path, "drain", timeout=min(5.0, grace))
            except (OSError, asyncio.TimeoutError, ControlError) as error:
                log.warning("could not tell the gateway in Envoy to drain: %s", error)
        await self.engine.stop(grace)
        shutil.rmtree(self._control_dir, ignore_errors=True)

    async def reload(self, config_text: str = "") -> str:
        """Reload the gateway inside Envoy: `config_text`, or "" to read its config file again.
        ControlError with the loader's message when the config is refused."""
        # One line each way: the text travels as a JSON string.
        return await send_control(self.control_path, "reload", json.dumps(config_text) if config_text else "")

    async def reload_file(self) -> str:
        """Reload the gateway inside Envoy from its config file (as Gateway.reload_file)."""
        return await self.reload()

    async def wait(self) -> None:
        await self.engine.wait()


def serving_gateway(config: GatewayConfig, mapping: dict, envoy_stderr=None,
                    worker: WorkerRole | None = None, config_path: str | None = None) -> "Gateway | EnvoyGateway":
    """The gateway on the engine its config names (`server.engine`); `envoy_stderr`: where the
    Envoy process's standard error goes on the envoy engine (a file; None: this process's);
    `worker`: this process is one worker of several (gateway/workers/); `config_path`: the file the
    config came from (reloads read it again, and it is watched)."""
    if config.server.resolved_engine() == "envoy":
        return EnvoyGateway(config, mapping, stderr=envoy_stderr, worker=worker, config_path=config_path)
    return Gateway(config, worker=worker, config_path=config_path)
