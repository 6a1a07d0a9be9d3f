"""All backends of all pools, and the background health checks that keep their state current."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from gateway.errors import GatewayError
from gateway.protocol import pb
from gateway.upstream.backend import Backend, Health
from gateway.upstream.config import HealthConfig, PoolConfig, UpstreamConfig

log = logging.getLogger(__name__)


class Fleet:
    """The pools of backends. `generation` changes whenever any backend's health or models change,
    so routing tables derived from the fleet know when to rebuild."""

    def __init__(self, pools: dict[str, PoolConfig], upstream: UpstreamConfig, health: HealthConfig) -> None:
        http = upstream.transport == "http"
        self.pools: dict[str, list[Backend]] = {
            name: [
                Backend(address, name, upstream,
                        http_address=pool.http_address(index, upstream.http_port_offset) if http else None)
                for index, address in enumerate(pool.backends)
            ]
            for name, pool in pools.items()
        }
        self.health_config = health
        self.generation = 0
        self._listeners: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task] = []
        for backend in self.backends():
            backend.on_change = self._changed

    def __repr__(self) -> str:
        healthy = sum(b.healthy for b in self.backends())
        return f"<Fleet pools={list(self.pools)} backends={len(self.backends())} healthy={healthy}>"

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

    # ---- health checks -----------------------------------------------------------------------

    async def start(self, wait_s: float = 10.0) -> None:
        """Start health checking; wait (up to wait_s) until every backend has been checked once."""
        self._tasks = [asyncio.ensure_future(self._check_loop(b)) for b in self.backends()]
        deadline = asyncio.get_running_loop().time() + wait_s
        while any(b.health is Health.UNKNOWN for b in self.backends()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)

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
            backend.mark(Health.UNHEALTHY, reason)

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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self.backends()), return_exceptions=True)
