"""A bounded pool of keep-alive HTTP/1.1 connections to one backend: one request in flight on each.

Why not a library: a request here is one `transport.writelines()` (uvloop: one writev on the
loop thread) and its answer is parsed by httptools inside `data_received()`, which resolves the
caller's future directly: no task, no thread hop, no copy of the tensor bytes on the way out. That
is what makes Triton's HTTP endpoint cheaper for the gateway than a gRPC stream (RESULTS.md,
"Upstream transports").

    pool = HttpPool("127.0.0.1", 8000, max_connections=64, connect_timeout_s=2.0, max_body_bytes=…)
    answer = await pool.request(b"POST", b"/v2/models/m/infer", headers, [json_header, *tensors])

Invariants:
- a connection carries one request at a time (no pipelining); it goes back to the pool only after
  its whole answer was read and the server kept the connection open;
- a caller cancelled while its request is on a connection aborts that connection: the rest of
  the answer must never be read as the next request's;
- a caller cancelled while waiting for a connection takes none (one handed to it just then goes
  to the next waiter);
- `connections` counts open and opening connections and never exceeds `max_connections`;
- every failure to connect, to write or to read a whole answer is `ConnectionFailed` (the
  backend, not the request, is at fault); an answer that cannot be parsed is too.

A keep-alive connection the server closed while it sat idle may fail the next request before any
byte of its answer arrives; such a request is sent once more on a new connection (Triton has not
seen it: an HTTP server reads a request only from a connection it still has open).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl as ssl_module
from typing import Callable

import httptools

__all__ = ["ConnectionAbandoned", "ConnectionFailed", "HttpAnswer", "HttpPool"]


SHUTTING_DOWN = "the gateway is shutting down; retry the request"


class ConnectionFailed(Exception):
    """The backend could not be reached, or a connection broke before the whole answer came."""

    def __init__(self, message: str, *, answered: bool = True, public: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.answered = answered
        """False when not a byte of the answer arrived (the request may be sent again elsewhere)."""
        self.public = public
        """What the client may be told, without the backend's address ("": the generic text)."""


class ConnectionAbandoned(ConnectionFailed):
    """The pool's owner gave up on the backend (`HttpPool.abandon`): the request is not resent here."""


class AnswerTooLarge(ConnectionFailed):
    """The answer announced a body larger than the pool's `max_body_bytes`."""


class HttpAnswer:
    """One HTTP answer: status, the inference header length (binary tensor extension), body."""

    __slots__ = ("status", "header_length", "body")

    def __init__(self, status: int, header_length: int, body: bytes) -> None:
        self.status = status
        self.header_length = header_length
        """Inference-Header-Content-Length: the JSON part of the body; -1 if the header was absent."""
        self.body = body

    def __repr__(self) -> str:
        return f"<HttpAnswer {self.status} header={self.header_length} body={len(self.body or b'')} bytes>"

    def take_body(self) -> bytes:
        """The body, given away: passed on as the only reference, a large one goes once its reader is done."""
        body, self.body = self.body, None
        return body


_FILL_IN_PLACE_FROM = 256 * 1024  # answers from this size on are read into one buffer (a bytearray)
_HEADER_LENGTH = b"inference-header-content-length"
_CONTENT_LENGTH = b"content-length"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; the pool hands it to one request at a time (`send`)."""

    __slots__ = ("_pool", "_transport", "_parser", "_waiter", "_chunks", "_header_length", "_got_bytes", "_whole", "_filled",
                 "_sent", "reused", "closed")

    def __init__(self, pool: "HttpPool") -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future | None = None
        self._chunks: list[bytes] = []
        self._whole: memoryview | None = None  # a large answer's body, filled in place (see on_header)
        self._header_length = -1
        self._got_bytes = False
        self._sent: list | None = None  # the request's parts, until its answer begins (see data_received)
        self.reused = False
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP: a Unix socket
                pass

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        sent = self._sent
        if sent is not None:
            # The answer began: the request will not be sent again (HttpPool.request resends only
            # a request of which not a byte was answered), so its parts — a large request's tensor
            # bytes — need not be held while the answer arrives. (The transport keeps its own
            # references to what it has not written yet.)
            sent.clear()
            self._sent = None
        try:
            self._parser.feed_data(data)
        except ConnectionFailed as error:  # raised by a callback (an answer over the size limit)
            self._fail(error)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionFailed(f"backend {self._pool.address}: unexpected protocol upgrade"))
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, ConnectionFailed):
                self._fail(error.__context__)
            else:
                self._fail(ConnectionFailed(f"backend {self._pool.address}: malformed HTTP answer: {error}"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._pool._lost(self)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            reason = f": {exc}" if exc else " by the backend"
            waiter.set_exception(ConnectionFailed(
                f"backend {self._pool.address}: connection closed{reason}", answered=self._got_bytes))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 31 and name.lower() == _HEADER_LENGTH:
            self._header_length = int(value)
        elif len(name) == 14 and name.lower() == _CONTENT_LENGTH:
            length = int(value)
            if length > self._pool.max_body_bytes:
                public = (f"the answer of {length} bytes is larger than the limit, "
                          f"upstream.max_message_bytes = {self._pool.max_body_bytes}")
                raise AnswerTooLarge(f"backend {self._pool.address}: {public}", public=public)
            if length >= _FILL_IN_PLACE_FROM:
                # One buffer of the body's size, filled as it arrives: joining the chunks at the
                # end would hold the answer twice.
                self._whole = memoryview(bytearray(length))
                self._filled = 0

    def on_body(self, body: bytes) -> None:
        whole = self._whole
        if whole is None:
            self._chunks.append(body)
            return
        end = self._filled + len(body)
        whole[self._filled:end] = body
        self._filled = end

    def on_message_complete(self) -> None:
        chunks = self._chunks
        if self._whole is not None:
            body, self._whole = self._whole.obj, None
        else:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = HttpAnswer(self._parser.get_status_code(), self._header_length, body)
        self._chunks = []
        self._header_length = -1
        self._got_bytes = False
        waiter, self._waiter = self._waiter, None
        if waiter is None:  # an answer nobody asked for: the connection cannot be trusted
            self.close()
            return
        if self._parser.should_keep_alive():
            self._pool._release(self)
        else:
            self.close()
        if not waiter.done():
            waiter.set_result(answer)

    # -- used by the pool -----------------------------------------------------------------------

    def send(self, parts: list) -> asyncio.Future:
        """Write one request (its parts, unjoined) and return the future of its answer."""
        waiter = self._pool._loop.create_future()
        self._waiter = waiter
        self._transport.writelines(parts)
        self._sent = parts
        return waiter

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        """Abort the connection (what is buffered either way is dropped; it is never reused)."""
        if not self.closed:
            self.closed = True
            self._pool._lost(self)
            if self._transport is not None:
                self._transport.abort()


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one backend, at most `max_connections` at once.

    `on_broken(reason)` is called when the backend cannot be reached or a connection breaks under
    a request (not when a caller's cancellation closes one): the backend's owner ejects it.
    """

    def __init__(self, host: str, port: int, *, max_connections: int, connect_timeout_s: float,
                 max_body_bytes: int, on_broken: Callable[[str], None] = lambda reason: None,
                 ssl: ssl_module.SSLContext | None = None, server_hostname: str | None = None,
                 unix_path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        """Connect to this Unix socket instead of host:port (a Triton on the same node, its HTTP
        endpoint started with `--http-address=unix:PATH`)."""
        self.ssl = ssl
        """TLS toward the backend (a client context that verifies it), or None: plaintext."""
        self.server_hostname = server_hostname
        """With ssl: the name the backend's certificate is checked against; None: `host`."""
        if unix_path is not None:
            self.address = f"unix:{unix_path}"
        else:
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.max_body_bytes = max_body_bytes
        self._on_broken = on_broken
        self._idle: list[_Connection] = []
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host_header = f"Host: {'localhost' if unix_path is not None else self.address}\r\n".encode()
        self._tls = {} if ssl is None else {"ssl": ssl, "server_hostname": server_hostname or host}
        self.requests = 0
        self.connects = 0
        self.resent = 0

    def __repr__(self) -> str:
        return (f"<HttpPool {self.address} [Connections: {len(self._open) - len(self._idle)} active, "
                f"{len(self._idle)} idle, {self._connecting} opening | Waiting: {len(self._waiters)} | "
                f"requests={self.requests} connects={self.connects} resent={self.resent}]>")

    @property
    def connections(self) -> int:
        return len(self._open) + self._connecting

    def snapshot(self) -> dict[str, int]:
        return {"active": len(self._open) - len(self._idle), "idle": len(self._idle), "opening": self._connecting,
                "waiting": len(self._waiters), "requests": self.requests, "connects": self.connects,
                "resent": self.resent}

    # -- a request ------------------------------------------------------------------------------

    async def request(self, parts: list) -> HttpAnswer:
        """Send one whole request (request line and headers first, then body parts) and return its answer.

        `parts` is emptied once the answer begins: the caller should hold no other reference to
        large parts, so that they go while the answer arrives.

        Raises ConnectionFailed (the backend is unreachable or went away) or AnswerTooLarge.
        """
        self.requests += 1
        connection = await self._acquire()
        try:
            return await self._exchange(connection, parts)
        except ConnectionFailed as failure:
            if failure.answered or not connection.reused or self._closed:
                raise
        # A kept-alive connection the backend had closed: send it once more on a new one.
        self.resent += 1
        return await self._exchange(await self._acquire(fresh=True), parts)

    async def _exchange(self, connection: _Connection, parts: list) -> HttpAnswer:
        waiter = connection.send(parts)
        try:
            return await waiter
        except (AnswerTooLarge, ConnectionAbandoned):
            raise
        except ConnectionFailed as failure:
            if failure.answered or not connection.reused:
                self._on_broken(failure.message)
            raise
        except BaseException:
            # Cancelled before the answer came: its rest must never reach the connection's next
            # user. (Once answered, the connection is already back in the pool: leave it.)
            if waiter.cancelled() or not waiter.done():
                connection.close()
            raise

    # -- the pool -------------------------------------------------------------------------------

    async def _acquire(self, fresh: bool = False) -> _Connection:
        if self._closed:
            raise ConnectionFailed(f"backend {self.address}: the gateway is shutting down", answered=False,
                                   public=SHUTTING_DOWN)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        idle = self._idle
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        if self.connections < self.max_connections:
            return await self._connect()
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            connection = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed to us just as we were cancelled: pass it on
                handed = waiter.result()
                if handed is None:
                    self._wake_one(None)
                else:
                    self._release(handed)
            raise
        if connection is None:  # a slot freed up (a connection closed): open one
            return await self._connect()
        connection.reused = True
        return connection

    async def _connect(self) -> _Connection:
        self._connecting += 1
        try:
            if self.unix_path is not None:
                opening = self._loop.create_unix_connection(lambda: _Connection(self), self.unix_path, **self._tls)
            else:
                opening = self._loop.create_connection(lambda: _Connection(self), self.host, self.port, **self._tls)
            _, connection = await asyncio.wait_for(opening, self.connect_timeout_s)
        except BaseException as error:
            self._connecting -= 1
            self._wake_one(None)  # the slot is free again: let a waiter try
            if isinstance(error, asyncio.TimeoutError):
                reason = f"backend {self.address}: no connection within {self.connect_timeout_s:g} s"
            elif isinstance(error, (OSError, OverflowError)):
                reason = f"backend {self.address} is unreachable: {getattr(error, 'strerror', None) or error}"
            else:
                raise
            self._on_broken(reason)
            raise ConnectionFailed(reason, answered=False) from None
        self._connecting -= 1
        self.connects += 1
        if connection.closed:  # lost before we got it
            self._wake_one(None)
            raise ConnectionFailed(f"backend {self.address}: connection closed at once", answered=False)
        self._open.add(connection)
        return connection

    def _wake_one(self, connection: _Connection | None) -> bool:
        """Hand `connection` (or, if None, the right to open one) to the oldest live waiter."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def _release(self, connection: _Connection) -> None:
        if connection.closed:
            return
        if self._closed:
            connection.close()
        elif not self._wake_one(connection):
            self._idle.append(connection)

    def _lost(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            if connection in self._idle:
                self._idle.remove(connection)
            if not self._closed:
                self._wake_one(None)  # a slot is free: the oldest waiter may open a connection

    def abandon(self, reason: str) -> int:
        """Fail every request on a connection or waiting for one with ConnectionAbandoned (their
        connections are closed: what they would still read must not reach a later request); idle
        connections stay, and new requests are taken as before. Returns the requests failed."""
        failed = 0
        idle = set(self._idle)
        for connection in list(self._open):
            if connection not in idle and connection._waiter is not None:
                connection._fail(ConnectionAbandoned(reason))
                failed += 1
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionAbandoned(reason, answered=False))
                failed += 1
        return failed

    def close(self) -> None:
        """Close every connection; requests on them fail with ConnectionFailed, new ones are refused."""
        self._closed = True
        for connection in list(self._open):
            connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionFailed(f"backend {self.address}: the gateway is shutting down",
                                                      public=SHUTTING_DOWN))
