"""The h2 engine: gRPC over HTTP/2 on the gateway's own event loop, with libnghttp2 as the codec.

The gRPC layer the envoy engine runs too (GrpcAsgiApp, gateway/server/engines/grpc_asgi.py) served by
`gateway.ext.h2server`, an HTTP/2 server written for this: a Cython asyncio Protocol over libnghttp2.
Nothing crosses a thread: the loop reads the socket, libnghttp2 parses frames and headers in C, the
handlers run on the same loop, and what one loop turn answers leaves in one write. On the envoy
engine a request crosses Envoy's worker thread, pyvoy's executor and the loop (about eight wake-ups
a request), which at a moderate rate costs more than the gateway's own Python
(benchmarks/RESULTS.md).

A client that resets its stream has its handler's task cancelled at once (no polling, unlike pyvoy),
so the app runs with `poll_s=None`. `stop` sends GOAWAY, lets calls in flight finish within the
grace, then closes the connections (their calls are cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Iterable

from gateway.server.engines.grpc_asgi import DEFAULT_MAX_MESSAGE_BYTES, GrpcAsgiApp
from gateway.server.rpc import Method

log = logging.getLogger(__name__)

try:
    from gateway.ext import h2server
except ImportError as error:  # built only where libnghttp2 is installed (setup.py)
    h2server = None
    _MISSING = str(error)
else:
    _MISSING = ""


def available() -> bool:
    """Whether this installation has the h2 engine (its extension links libnghttp2)."""
    return h2server is not None


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or ":port" (every address)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r}: expected host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return (host or "0.0.0.0"), int(port)


class H2Engine:
    """gRPC on `listen` ("host:port"; port 0 picks one) serving `methods`, HTTP/2 by libnghttp2.

    ssl_context             TLS (mutual TLS when it requires client certificates); None: plaintext
    max_concurrent_streams  HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection
    stream_window_bytes     what a call may send before the gateway has read it (per stream)
    connection_window_bytes the connection's flow-control window
    reuse_port              SO_REUSEPORT, so several worker processes serve one port
    """

    def __init__(self, listen: str, methods: Iterable[Method], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 ssl_context: ssl.SSLContext | None = None,
                 max_concurrent_streams: int = 1024,
                 stream_window_bytes: int = 1024 * 1024,
                 connection_window_bytes: int = 2 * 1024 * 1024,
                 reuse_port: bool = False,
                 tick_s: float = 0.005) -> None:
        if h2server is None:
            raise RuntimeError(
                "the h2 engine is not built: its extension needs libnghttp2 (libnghttp2.so.14; Debian: "
                f"libnghttp2-14); install it and rebuild (make compile) ({_MISSING})")
        self.listen = listen
        self.app = GrpcAsgiApp(methods, max_message_bytes=max_message_bytes, tick_s=tick_s, poll_s=None)
        self.connections: set = set()  # h2server.Connection adds and removes itself
        self._ssl = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        self._options = dict(
            max_concurrent_streams=max_concurrent_streams,
            stream_window_bytes=stream_window_bytes,
            connection_window_bytes=connection_window_bytes,
            tls=ssl_context is not None,
        )
        self._reuse_port = reuse_port
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"<H2Engine {self.listen} port={self.port} connections={len(self.connections)}>"

    def _connection(self):
        return h2server.Connection(self.app, owner=self, **self._options)

    async def start(self) -> int:
        """Bind and serve; returns the port."""
        host, port = split_listen(self.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection, host, port, ssl=self._ssl, reuse_port=self._reuse_port or None,
            backlog=4096, family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def open_streams(self) -> int:
        return sum(connection.open_streams for connection in self.connections)

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new connections and calls (GOAWAY), give calls in flight `grace_s` to finish, then
        close every connection (calls still open are cancelled)."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        for connection in list(self.connections):
            connection.drain(final=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace_s or 0)
        while self.open_streams() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        await server.wait_closed()

    async def wait(self) -> None:
        server = self._server
        if server is not None:
            try:
                await server.serve_forever()
            except asyncio.CancelledError:
                if self._server is not None:
                    raise
