"""Test scaffolding shipped with the package: a real gateway on a real port, in a thread of its own.

Like asyncpg's `_testbase`, it runs the real thing and fails loudly: any exception the gateway's
event loop logs as unhandled is collected in `loop_errors`, and the test suite fails a test that
leaves one behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future
from typing import Any, Coroutine

from gateway.config import GatewayConfig, config_from_mapping
from gateway.app import Gateway


#: Runs a test suite over another upstream transport: `TENSORGATE_TEST_UPSTREAM_TRANSPORT=http pytest …`
#: sets `upstream.transport` in every config mapping that does not set it itself.
TRANSPORT_VARIABLE = "TENSORGATE_TEST_UPSTREAM_TRANSPORT"


def _with_test_transport(config: dict) -> dict:
    transport = os.environ.get(TRANSPORT_VARIABLE)
    upstream = config.get("upstream") or {}
    if not transport or "transport" in upstream:
        return config
    return {**config, "upstream": {**upstream, "transport": transport}}


class GatewayThread:
    """A Gateway served by an event loop (uvloop by default) in a daemon thread.

    `address` is where clients connect; `run(coro)` runs a coroutine on the gateway's loop (to
    inspect or change live state) and returns its result.
    """

    def __init__(self, config: GatewayConfig | dict, *, use_uvloop: bool = True) -> None:
        if not isinstance(config, GatewayConfig):
            config = config_from_mapping(_with_test_transport(config))
        self.config = config
        self.use_uvloop = use_uvloop
        self.loop_errors: list[dict[str, Any]] = []
        self.gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<GatewayThread {self.gateway!r} loop_errors={len(self.loop_errors)}>"

    @property
    def address(self) -> str:
        assert self.gateway is not None, "start() the gateway first"
        return self.gateway.address

    def start(self) -> "GatewayThread":
        if self.use_uvloop:
            import uvloop

            self._loop = uvloop.new_event_loop()
        else:
            self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="tensorgate-test-gateway", daemon=True)
        self._thread.start()
        self.gateway = self.run(self._create())
        return self

    async def _create(self) -> Gateway:
        # grpc.aio binds channels to the loop that is running when they are made.
        return await Gateway(self.config).start()

    def _on_loop_error(self, loop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def run(self, coroutine: Coroutine, timeout: float = 60.0) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    def call(self, function, *args) -> Any:
        """Call a plain function on the gateway's loop thread (its state is not thread-safe)."""

        async def invoke():
            return function(*args)

        return self.run(invoke())

    def stop(self) -> None:
        if self._loop is None:
            return
        if self.gateway is not None:
            self.run(self.gateway.stop(grace=0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        # The loop is stopped but deliberately not closed: grpc.aio's completion queue is shared by
        # the whole process and may still hand a late completion of this gateway's calls to this
        # loop; on a closed loop that raises "Event loop is closed" inside whichever other loop
        # is polling, failing an unrelated test.
        self._loop = None

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
