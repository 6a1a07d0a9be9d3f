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
from pathlib import Path
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
            try:
                return await EnvoyGateway(self.config, self.mapping, stderr=stderr).start()
            except Exception as error:
                # Envoy's own words go to the file, not to the test's output: say them here.
                said = Path(self.stderr_path).read_bytes()[-4000:].decode("utf-8", "replace").strip()
                raise RuntimeError(f"the envoy gateway did not start: {error!r}; Envoy's stderr "
                                   f"({self.stderr_path}) ends: {said or '(nothing)'}") from error

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


class WorkersProcess:
    """`tensorgate serve --workers N` as a real process tree: the parent (supervisor and hub) and its
    workers, started through the CLI from a config mapping written to a file.

    `address` is the one listen port; `prometheus_port` the parent's merged endpoint (when the
    config has `telemetry.prometheus_port`); `admin_snapshot()` asks whichever worker a new
    connection reaches; `stop()` sends SIGTERM to the parent and returns its exit status. The
    parent's and the workers' output is kept in `output_path`.
    """

    def __init__(self, config: dict, workers: int | str = 2, *, engine: str = "grpcio", verbose: bool = True) -> None:
        import yaml

        mapping = _with_test_transport(config)
        mapping = {**mapping, "server": {**(mapping.get("server") or {}), "engine": engine}}
        directory = tempfile.mkdtemp(prefix="tensorgate-workers-test-")
        self.config_path = os.path.join(directory, "gateway.yaml")
        with open(self.config_path, "w", encoding="utf-8") as stream:
            yaml.safe_dump(mapping, stream)
        self.output_path = os.path.join(directory, "output.log")
        self.workers = workers
        self.verbose = verbose
        self.process = None
        self.address: str | None = None
        self.prometheus_port: int | None = None

    def __repr__(self) -> str:
        return f"<WorkersProcess {self.address} pid={None if self.process is None else self.process.pid}>"

    def start(self, timeout: float = 120.0) -> "WorkersProcess":
        import subprocess
        import sys
        import time

        command = [sys.executable, "-m", "gateway", *(["-v"] if self.verbose else []), "serve",
                   "--config", self.config_path, "--workers", str(self.workers)]
        self._output = open(self.output_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"^tensorgate serving on (\S+) .*?(?:metrics on http://[^:]+:(\d+)/metrics)?\)$", re.M)
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                self.address = match.group(1)
                self.prometheus_port = int(match.group(2)) if match.group(2) else None
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop(kill=True)
        raise RuntimeError(f"the workers did not start; output:\n{self.output()[-5000:]}")

    def output(self) -> str:
        with open(self.output_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def admin_snapshot(self) -> dict:
        """GetSnapshot over a new channel (so a new connection: any worker may answer)."""
        with grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot",
                                       request_serializer=SnapshotRequest.SerializeToString,
                                       response_deserializer=Snapshot.FromString)
            return json.loads(call(SnapshotRequest(), timeout=10).json)

    def worker_pids(self) -> dict[int, int | None]:
        """{worker id: pid of its process now}, from the merged snapshot."""
        return {int(k): v["pid"] for k, v in self.admin_snapshot()["workers"].items()}

    def stop(self, kill: bool = False, timeout: float = 60.0) -> int | None:
        import signal
        import subprocess

        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        return self.process.returncode

    def __enter__(self) -> "WorkersProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
