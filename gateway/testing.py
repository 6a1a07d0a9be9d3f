"""Test scaffolding shipped with the package: a real gateway on a real port.

`GatewayThread` runs the Gateway in a thread of this process on the grpcio engine (so tests may
inspect and change its live state with `call`); `EnvoyGatewayThread` runs it on the envoy engine,
in the Envoy process that a thread here launches and stops. Both give `address`, `snapshot()` (the
live state: backends, routing, sequences, batching) and `take_loop_errors()`.

Like asyncpg's `_testbase`, they run the real thing and fail loudly: any exception the gateway's
event loop logs as unhandled is collected, and the test suite fails a test that leaves one behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import threading
from concurrent.futures import Future
from typing import Any, Coroutine

import grpc

from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import Snapshot, SnapshotRequest
from gateway.app import EnvoyGateway, Gateway
from gateway.config import GatewayConfig, config_from_mapping


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
        self.mapping = _with_test_transport(config) if isinstance(config, dict) else None
        if not isinstance(config, GatewayConfig):
            config = config_from_mapping(self.mapping)
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

    def snapshot(self) -> dict:
        """The gateway's live state (Gateway.snapshot), read on its loop."""
        return self.call(self.gateway.snapshot)

    def admin_snapshot(self) -> dict:
        """The gateway's live state as the admin GetSnapshot answers it (JSON: mapping keys are strings)."""
        with grpc.insecure_channel(self.address) as channel:
            call = channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot",
                                       request_serializer=SnapshotRequest.SerializeToString,
                                       response_deserializer=Snapshot.FromString)
            return json.loads(call(SnapshotRequest(), timeout=10).json)

    def take_loop_errors(self) -> list:
        """The unhandled event-loop errors logged since the last call (and forget them)."""
        errors, self.loop_errors[:] = list(self.loop_errors), []
        return errors

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


#: What an event loop writes to stderr for an exception nobody handled (asyncio's default handler).
_UNHANDLED = re.compile(r"^(Exception in callback|Task exception was never retrieved|"
                        r"Future exception was never retrieved|Unhandled error in exception handler)", re.M)


class EnvoyGatewayThread(GatewayThread):
    """The gateway on the envoy engine: Envoy (with the gateway's stages in its embedded Python) in
    a process of its own, launched and stopped from a loop in a thread here. `call` and `gateway`
    reach only the launcher (the stages live in Envoy); use `snapshot()` for live state. Envoy's
    stderr goes to `stderr_path`; unhandled loop errors logged there are `take_loop_errors()`."""

    def __init__(self, config: dict, *, use_uvloop: bool = True) -> None:
        super().__init__(config, use_uvloop=use_uvloop)
        if self.mapping is None:
            raise TypeError("EnvoyGatewayThread takes the config as a mapping (Envoy loads it again)")
        handle, self.stderr_path = tempfile.mkstemp(prefix="tensorgate-envoy-", suffix=".log")
        os.close(handle)
        self._errors_seen = 0

    def __repr__(self) -> str:
        return f"<EnvoyGatewayThread {self.gateway!r} stderr={self.stderr_path}>"

    async def _create(self) -> EnvoyGateway:
        with open(self.stderr_path, "ab") as stderr:
            return await EnvoyGateway(self.config, self.mapping, stderr=stderr).start()

    def snapshot(self) -> dict:
        """The live state of the gateway inside Envoy: the admin GetSnapshot."""
        return self.admin_snapshot()

    def take_loop_errors(self) -> list:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        found = [match.group(0) + text[match.end():match.end() + 2000].split("\n\n")[0]
                 for match in _UNHANDLED.finditer(text)]
        new, self._errors_seen = found[self._errors_seen:], len(found)
        return new
