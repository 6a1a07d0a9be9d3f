"""All backends of all pools, the background health checks that keep their state current, and the
DNS discovery that adds and drains backends of pools named by DNS."""

from __future__ import annotations

import asyncio
import time
import logging
from typing import Callable

import grpc

from gateway.errors import GatewayError
from gateway.protocol import pb
from gateway.upstream.backend import Backend, Health
from gateway.upstream.config import HealthConfig, OutlierConfig, PoolConfig, UpstreamConfig, derived_http_address
from gateway.upstream.discovery import DnsDiscovery
from gateway.upstream.outlier import OutlierDetector

log = logging.getLogger(__name__)


class Fleet:
    """The pools of backends. `generation` changes whenever any backend's health or models change,
    or a backend joins or leaves, so routing tables derived from the fleet know when to rebuild.

    A pool's backends are the listed ones plus, for a pool with `dns:`, those its name resolves to
    now (gateway/upstream/discovery.py). A discovered backend joins unchecked (health UNKNOWN: no
    requests until its first good check); one whose address leaves DNS is DRAINING: no new
    requests, those in flight finish (up to `upstream.discovery.drain_s`), then it is closed and
    leaves its pool.
    """

    def __init__(self, pools: dict[str, PoolConfig], upstream: UpstreamConfig, health: HealthConfig,
                 outlier: OutlierConfig | None = None) -> None:
        self._upstream = upstream
        self._http = upstream.transport == "http"
        self.pools: dict[str, list[Backend]] = {
            name: [
                Backend(address, name, upstream,
                        http_address=pool.http_address(index, upstream.http_port_offset) if self._http else None)
                for index, address in enumerate(pool.backends)
            ]
            for name, pool in pools.items()
        }
        self.discovery = {
            name: DnsDiscovery(pool.dns, upstream.discovery) for name, pool in pools.items() if pool.dns is not None
        }
        self._discovered: dict[str, dict[str, Backend]] = {name: {} for name in self.discovery}
        self.health_config = health
        self.generation = 0
        self._listeners: list[Callable[[], None]] = []
        self._checks: dict[Backend, asyncio.Task] = {}
        self._drains: dict[Backend, asyncio.Task] = {}
        self._resolvers: list[asyncio.Task] = []
        self._started = False
        for backend in self.backends():
            backend.on_change = self._changed
        # Reads the pools live: backends that join later (DNS) are watched from their first sweep.
        self.outliers = OutlierDetector(outlier or OutlierConfig(), self.pools, self._changed)
        self._outlier_task: asyncio.Task | None = None

    def __repr__(self) -> str:
        healthy = sum(b.healthy for b in self.backends())
        return (f"<Fleet pools={list(self.pools)} backends={len(self.backends())} healthy={healthy} "
                f"draining={len(self._drains)}>")

    def backends(self) -> list[Backend]:
        return [backend for pool in self.pools.values() for backend in pool]

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self.generation += 1
        for listener in self._listeners:
            listener()

    def known_models(self) -> set[tuple[str, str]]:
        """(model, version) pairs some backend reported ready at its last successful check."""
        return {key for backend in self.backends() for key in backend.ready_models}

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, wait_s: float = 10.0) -> None:
        """Resolve the DNS pools once, start health checking and re-resolving; wait (up to wait_s)
        until every backend has been checked once."""
        self._started = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        for backend in self.backends():
            self._start_checks(backend)
        self._outlier_task = asyncio.ensure_future(self.outliers.run())
        if self.discovery:
            await asyncio.gather(*(self.rediscover(pool) for pool in self.discovery))
            self._resolvers = [asyncio.ensure_future(self._resolve_loop(pool)) for pool in self.discovery]
        while any(b.health is Health.UNKNOWN for b in self.backends()):
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.02)

    def _start_checks(self, backend: Backend) -> None:
        if self._started and backend not in self._checks:
            self._checks[backend] = asyncio.ensure_future(self._check_loop(backend))

    def _stop_checks(self, backend: Backend) -> None:
        task = self._checks.pop(backend, None)
        if task is not None:
            task.cancel()

    # ---- DNS discovery -----------------------------------------------------------------------

    async def rediscover(self, pool: str) -> None:
        """Resolve the pool's name now and bring its discovered backends in line with the answer
        (no answer: nothing changes)."""
        addresses = await self.discovery[pool].resolve()
        if addresses is not None:
            self.set_discovered(pool, addresses)

    def set_discovered(self, pool: str, addresses: frozenset[str]) -> None:
        """Make `addresses` the pool's discovered backends: new ones join (health checked before
        they get requests), missing ones drain. A listed backend is never duplicated or drained."""
        discovered = self._discovered[pool]
        listed = {b.address for b in self.pools[pool] if b not in discovered.values()}
        wanted = addresses - listed
        changed = False
        for address in sorted(wanted):
            backend = discovered.get(address)
            if backend is None:
                http_address = derived_http_address(address, self._upstream.http_port_offset) if self._http else None
                backend = Backend(address, pool, self._upstream, http_address=http_address)
                backend.on_change = self._changed
                discovered[address] = backend
                self.pools[pool].append(backend)
                log.info("backend %s joins pool %s (found in DNS %s)", address, pool, self.discovery[pool].target)
                changed = True
            elif backend in self._drains:  # back in DNS before it finished draining
                self._drains.pop(backend).cancel()
                backend.mark(Health.UNKNOWN, "back in DNS; not checked yet")
            self._start_checks(backend)
        for address in sorted(set(discovered) - wanted):
            backend = discovered[address]
            if backend not in self._drains:
                self._drain(backend)
        if changed:
            self._changed()

    def _drain(self, backend: Backend) -> None:
        """No new requests for `backend`; close it when those in flight are done (or drain_s passes)."""
        self._stop_checks(backend)
        backend.mark(Health.DRAINING, "its address left DNS: finishing the requests in flight")
        self._drains[backend] = asyncio.ensure_future(self._close_when_drained(backend))

    async def _close_when_drained(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._upstream.discovery.drain_s
        while backend.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if backend.outstanding:
            log.warning("backend %s: closed after draining %.0f s with %d requests still in flight",
                        backend.address, self._upstream.discovery.drain_s, backend.outstanding)
        del self._drains[backend]
        self._discovered[backend.pool].pop(backend.address, None)
        self.pools[backend.pool].remove(backend)
        log.info("backend %s leaves pool %s (drained)", backend.address, backend.pool)
        self._changed()
        await backend.close()

    async def _resolve_loop(self, pool: str) -> None:
        interval = self._upstream.discovery.interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rediscover(pool)
            except asyncio.CancelledError:
                raise
            except Exception:  # a resolver bug must never stop discovery
                log.exception("DNS discovery of pool %s failed unexpectedly", pool)

    # ---- health checks -----------------------------------------------------------------------

    async def check(self, backend: Backend) -> None:
        """One active check: ServerReady, then the ready models of RepositoryIndex; with the HTTP
        transport, also the HTTP endpoint's readiness (a wrong HTTP address shows here)."""
        timeout = self.health_config.timeout_s
        try:
            ready = await backend.call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, timeout)
            if not ready.ready:
                self._failed(backend, "server reports not ready")
                return
            index = await backend.call(
                "RepositoryIndex", pb.RepositoryIndexRequest(ready=True), pb.RepositoryIndexResponse, timeout
            )
            await backend.check_http(timeout)
        except (GatewayError, grpc.aio.AioRpcError, asyncio.TimeoutError) as error:
            text = error.for_log() if isinstance(error, GatewayError) else str(error)
            self._failed(backend, f"health check failed: {text!r}")
            return
        backend.failed_checks = 0
        backend.checked_ok_at = time.monotonic()
        models = set()
        for model in index.models:
            if model.state and model.state != "READY":
                continue
            models.add((model.name, model.version))
            models.add((model.name, ""))
        backend.mark(Health.HEALTHY, "ready", frozenset(models))

    def _failed(self, backend: Backend, reason: str) -> None:
        backend.failed_checks += 1
        if backend.health is not Health.HEALTHY or backend.failed_checks >= self.health_config.unhealthy_after:
            was_healthy = backend.healthy
            backend.mark(Health.UNHEALTHY, reason)
            if was_healthy and self.outliers.has_alternative(backend):
                # Out of rotation: what waits on it (a hung backend) is failed over, if there is
                # anywhere to go (else a slow backend's late answers are still worth waiting for).
                self.outliers.requests_failed_over += backend.abandon_pending(
                    f"backend {backend.address} failed its health checks while the request waited on it")

    async def _check_loop(self, backend: Backend) -> None:
        while True:
            try:
                await self.check(backend)
            except asyncio.CancelledError:
                raise
            except Exception:  # a checker bug must never stop checking
                log.exception("health check of %s failed unexpectedly", backend.address)
            await asyncio.sleep(self.health_config.interval_s)

    async def close(self) -> None:
        tasks = [*self._resolvers, *self._checks.values(), *self._drains.values()]
        if self._outlier_task is not None:
            tasks.append(self._outlier_task)
            self._outlier_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolvers, self._checks, self._drains = [], {}, {}
        await asyncio.gather(*(b.close() for b in self.backends()), return_exceptions=True)
