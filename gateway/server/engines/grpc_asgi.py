"""gRPC as an ASGI app: a Method table served over any HTTP/2 server that speaks ASGI with trailers.

Two engines serve it: h2 (gateway/server/engines/h2.py: libnghttp2 on the gateway's own loop,
ext/h2server.pyx) and envoy (pyvoy runs Envoy with a CPython interpreter embedded in it, and hands
each request to the app on an event loop inside the Envoy process; gateway/server/engines/envoy.py).
This app is gRPC on top of either (gateway/server/engines/grpc_wire.py) and the seam below it
(gateway/server/rpc.py): it routes `scope["path"]` to a Method, reads length-prefixed messages,
fills a `Call`, runs the handler, and ends every call with grpc-status/grpc-message trailers, or
with a trailers-only response when nothing was sent yet.

Under pyvoy the services cannot be built by the process that launches Envoy: they must live on
Envoy's event loop. So the app is given either `methods` (built beforehand: the h2 engine's, or a
stateless test table) or `services`, a factory ("module:attr" or a callable) that the ASGI lifespan
startup calls on each of pyvoy's event loops, and whose result the lifespan shutdown closes:

    factory(argument)          # or factory() when no argument was given; returns one of
      → an async context manager yielding the Methods   (entered at startup, exited at shutdown)
      → an awaitable of the Methods
      → the Methods

Cancellation: a handler's task is cancelled when its deadline passes (the call ends
DEADLINE_EXCEEDED), and a unary handler's when its client goes away (nothing more is sent). The h2
server cancels the task itself when the client resets the stream; pyvoy says so only when asked,
so there watch.py asks every `poll_s` once a call is that old. A streaming handler sees its client
leave as CancelledError from its request iterator, or at its next send; under pyvoy, while it does
neither, it is not told.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import inspect
import logging
import time
from functools import partial
from typing import AsyncIterator, Callable, Iterable

import grpc

from gateway.server.engines import grpc_wire
from gateway.server.engines.grpc_wire import WireError, frame, percent_encode, status_bytes
from gateway.server.engines.launcher_link import follow_launcher
from gateway.server.engines.watch import DEADLINE, CallWatch
from gateway.server.rpc import Call, Method, status_of, trailers_of

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "GrpcAsgiApp", "resolve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc's own default receive limit

_STATE_TABLE = "tensorgate.methods"
_VIEW_FROM = 64 * 1024  # messages from this size on are passed as views or sent unjoined, not copied
_GRPC = b"application/grpc"
_RESPONSE_HEADERS = [(b"content-type", _GRPC), (b"grpc-accept-encoding", grpc_wire.ACCEPT_ENCODING)]
_START = {"type": "http.response.start", "status": 200, "headers": _RESPONSE_HEADERS, "trailers": True}
_OK_TRAILERS = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}
_END_BODY = {"type": "http.response.body", "body": b"", "more_body": False}

# Request headers that are HTTP/2 or gRPC transport, not the call's metadata.
_NOT_METADATA = frozenset((
    b"content-type", b"te", b"host", b"content-length", b"accept-encoding",
    b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding",
))  # fmt: skip


class _ClientGone(Exception):
    """The client reset the stream: a send failed, so nothing more can reach it."""


def metadata_of(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    """A call's metadata from its request headers: lower-case keys, "-bin" values decoded."""
    metadata = []
    for key, value in headers:
        if key in _NOT_METADATA or key.startswith(b":"):
            continue
        name = key.decode("latin-1")
        if name.endswith("-bin"):
            for part in value.split(b","):
                part = part.strip()
                try:
                    metadata.append((name, base64.b64decode(part + b"=" * (-len(part) % 4))))
                except binascii.Error:  # not base64: the client's own garbage, passed on as sent
                    metadata.append((name, part))
        else:
            metadata.append((name, value.decode("latin-1")))
    return tuple(metadata)


def peer_of(scope: dict) -> str:
    """The client's address as grpc writes it: ipv4:127.0.0.1:5000, ipv6:[::1]:5000."""
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _metadata_headers(trailers) -> list[tuple[bytes, bytes]]:
    return [(key.encode("latin-1"), value.encode("latin-1")) for key, value in trailers]


def _trailers_only(code: grpc.StatusCode, message: str, trailers=()) -> dict:
    headers = [(b"content-type", _GRPC), (b"grpc-accept-encoding", grpc_wire.ACCEPT_ENCODING),
               (b"grpc-status", status_bytes(code))]
    if message:
        headers.append((b"grpc-message", percent_encode(message)))
    if trailers:
        headers += _metadata_headers(trailers)
    return {"type": "http.response.start", "status": 200, "headers": headers, "trailers": False}


def _trailers(code: grpc.StatusCode, message: str, trailers=()) -> dict:
    if code is grpc.StatusCode.OK:
        return _OK_TRAILERS
    headers = [(b"grpc-status", status_bytes(code))]
    if message:
        headers.append((b"grpc-message", percent_encode(message)))
    if trailers:
        headers += _metadata_headers(trailers)
    return {"type": "http.response.trailers", "headers": headers, "more_trailers": False}


def _uncancel(task: asyncio.Task) -> None:
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None:
        uncancel()


def resolve(target: str | Callable) -> Callable:
    """The object a "module:attr" string names (a callable is returned as is)."""
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in (attr or "app").split("."):
        obj = getattr(obj, part)
    return obj


class GrpcAsgiApp:
    """An ASGI app serving `methods` (or the Methods `services` builds at startup) as gRPC.

    max_message_bytes  largest request message (decompressed too); larger: RESOURCE_EXHAUSTED,
                       refused from its length prefix before it is read
    tick_s, poll_s     deadline precision, and how often a long unary call's client is checked
                       (None: never; see watch.py)
    """

    def __init__(
        self,
        methods: Iterable[Method] | None = None,
        *,
        services: str | Callable | None = None,
        argument: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tick_s: float = 0.005,
        poll_s: float | None = 0.5,
    ) -> None:
        if (methods is None) == (services is None):
            raise ValueError("give exactly one of methods or services")
        self._table = None if methods is None else self._index(methods)
        self._services = services
        self._argument = argument
        self.max_message_bytes = max_message_bytes
        self._tick_s = tick_s
        self._poll_s = poll_s
        self._watches: dict[asyncio.AbstractEventLoop, CallWatch] = {}
        self.calls = 0

    def __repr__(self) -> str:
        table = "from services" if self._table is None else f"{len(self._table)} methods"
        return f"<GrpcAsgiApp {table} calls={self.calls} watches={list(self._watches.values())}>"

    @staticmethod
    def _index(methods: Iterable[Method]) -> dict[str, Method]:
        table = {}
        for method in methods:
            if method.path in table:
                raise ValueError(f"method {method.path} is served twice")
            table[method.path] = method
        return table

    # ------------------------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            raise RuntimeError(f"the gRPC app serves http, not {kind}")

    async def _serve(self, scope: dict, receive: Callable, send: Callable) -> None:
        self.calls += 1
        table = self._table
        if table is None:
            state = scope.get("state")
            table = state.get(_STATE_TABLE) if state else None
            if table is None:
                await send(_trailers_only(grpc.StatusCode.UNAVAILABLE, "the services are not started"))
                await send(_END_BODY)
                return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type")
        if scope["method"] != "POST" or (content_type != _GRPC and not grpc_wire.is_grpc_content_type(content_type)):
            await self._refuse_http(scope, send, content_type)
            return
        method = table.get(scope["path"])
        try:
            if method is None:
                raise WireError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {scope['path']}")
            timeout = headers.get(b"grpc-timeout")
            deadline = None if timeout is None else time.monotonic() + grpc_wire.parse_timeout(timeout)
            encoding = headers.get(b"grpc-encoding")
            inflate = None if encoding is None else grpc_wire.inflater(encoding, self.max_message_bytes)
        except WireError as error:
            await self._end_early(send, error.code, error.message)
            return
        call = Call(deadline, partial(metadata_of, scope["headers"]), partial(peer_of, scope), headers)
        if method.streaming:
            await self._stream(method, call, inflate, receive, send)
        else:
            await self._unary(method, call, inflate, receive, send)

    # ---------------------------------------------------------------------------------- unary

    async def _unary(self, method: Method, call: Call, inflate, receive: Callable, send: Callable) -> None:
        watch = watched = None
        trailers = ()
        gate = method.gate
        held = [0]  # bytes admitted by the method's gate, released however the call ends
        try:
            request = await self._read_one(receive, inflate, gate, held)
            if request is None:
                return  # the client left before its request was complete
            if call.deadline is not None or self._poll_s is not None:
                if call.deadline is not None and call.deadline <= time.monotonic():
                    raise WireError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
                watch = self._watch()
                watched = watch.add(asyncio.current_task(), call.deadline, receive)
            # The handler gets the only reference to the request's bytes: once it has parsed them it
            # may let them go, and a large request is not held twice while it is served.
            box = [request]
            request = None
            reply = await method.handler(box.pop(), call)
        except asyncio.CancelledError:
            if watched is None or watched.ended_by is None:
                raise  # the server itself is cancelling us
            _uncancel(watched.task)
            if watched.ended_by != DEADLINE:
                return  # the client is gone: nobody to answer
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        except WireError as error:
            code, message = error.code, error.message
        except Exception as error:
            code, message = status_of(error, method.path)
            trailers = trailers_of(error)
        else:
            if watched is not None:
                watch.discard(watched)
                watched = None
            try:
                await send(_START)
                if len(reply) < _VIEW_FROM:
                    await send({"type": "http.response.body", "body": frame(reply), "more_body": False})
                else:  # a large answer: its prefix, then the message itself, never joined (a copy)
                    await send({"type": "http.response.body", "body": grpc_wire.prefix(len(reply)), "more_body": True})
                    await send({"type": "http.response.body", "more_body": False,
                                "body": reply if type(reply) is bytes else bytes(reply)})  # pyvoy sends bytes only
                reply = None
                await send(_OK_TRAILERS)
            except OSError:
                pass  # the client reset the stream meanwhile
            return
        finally:
            if watched is not None:
                watch.discard(watched)
            if held[0]:
                gate.release(held[0])
        await self._end_early(send, code, message, trailers)

    async def _read_one(self, receive: Callable, inflate, gate=None, held: list | None = None) -> bytes | None:
        """The one request message of a unary call (None: the client disconnected).

        With a `gate`, the message is admitted by the size its length prefix announces, before
        the rest of it is read (a refusal raises at once); `held[0]` is then the size admitted."""
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if gate is not None:
            announced = int.from_bytes(body[1:5], "big") if len(body) >= 5 else len(body)
            gate.admit(announced)
            held[0] = announced
        if not more and inflate is None and len(body) >= 5 and body[0] == 0:  # the usual: all of it, uncompressed
            length = int.from_bytes(body[1:5], "big")
            if length == len(body) - 5 and length <= self.max_message_bytes:
                # A view, not a copy: handlers parse it (upb reads any buffer) and measure it.
                return memoryview(body)[5:] if length >= _VIEW_FROM else body[5:]
        decoder = grpc_wire.MessageDecoder(self.max_message_bytes, inflate)
        messages = decoder.feed(body)
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            more = message.get("more_body", False)
            messages += decoder.feed(message.get("body", b""))
            if len(messages) > 1:
                break
        else:
            decoder.finish()
        if len(messages) != 1:
            count = "none" if not messages else "more than one"
            raise WireError(grpc.StatusCode.INTERNAL,
                            f"a unary call takes exactly one request message; {count} received")
        return messages[0]

    # ------------------------------------------------------------------------------ streaming

    async def _stream(self, method: Method, call: Call, inflate, receive: Callable, send: Callable) -> None:
        decoder = grpc_wire.MessageDecoder(self.max_message_bytes, inflate)
        gone = []  # set (non-empty) when the request iterator saw the client leave
        if call.deadline is not None:
            # The watch may cancel this task while it awaits pyvoy's receive or send futures; pyvoy
            # completes those later regardless, and a cancelled one makes its loop log an
            # InvalidStateError. Shielded, they stay pending until pyvoy completes them.
            receive, send = _shielded(receive), _shielded(send)
        requests = self._requests(receive, decoder, gone)
        watched = None
        started = False
        responses = watch = None
        trailers = ()
        try:
            if call.deadline is not None:
                if call.deadline <= time.monotonic():
                    raise WireError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
                watch = self._watch()
                watched = watch.add(asyncio.current_task(), call.deadline)
            responses = method.handler(requests, call)
            async for reply in responses:
                body = frame(reply)
                try:
                    if not started:
                        await send(_START)
                        started = True
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except OSError as error:
                    raise _ClientGone from error
        except asyncio.CancelledError:
            if gone:
                return  # raised by the request iterator: the client left
            if watched is None or watched.ended_by is None:
                raise
            _uncancel(watched.task)
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        except _ClientGone:
            return
        except WireError as error:
            code, message = error.code, error.message
        except Exception as error:
            code, message = status_of(error, method.path)
            trailers = trailers_of(error)
        else:
            code, message = grpc.StatusCode.OK, ""
        finally:
            if watched is not None:
                watch.discard(watched)
            if responses is not None and hasattr(responses, "aclose"):
                await _quietly(responses.aclose())
            await _quietly(requests.aclose())
        if not started:
            await self._end_early(send, code, message, trailers)
            return
        try:
            await send(_END_BODY)
            await send(_trailers(code, message, trailers))
        except OSError:
            pass

    @staticmethod
    async def _requests(receive: Callable, decoder: grpc_wire.MessageDecoder, gone: list) -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                gone.append(True)
                raise asyncio.CancelledError("the client cancelled the call")
            for request in decoder.feed(message.get("body", b"")):
                yield request
            if not message.get("more_body", False):
                decoder.finish()
                return

    # ------------------------------------------------------------------------------- endings

    async def _end_early(self, send: Callable, code: grpc.StatusCode, message: str, trailers=()) -> None:
        """A trailers-only response: the status in the only HEADERS frame, which ends the stream."""
        try:
            await send(_trailers_only(code, message, trailers))
            await send(_END_BODY)
        except OSError:
            pass

    async def _refuse_http(self, scope: dict, send: Callable, content_type: bytes | None) -> None:
        """Not a gRPC request: answer in HTTP, as gRPC asks (415 for a foreign content-type)."""
        if scope["method"] != "POST":
            status, text = 405, f"gRPC takes POST, not {scope['method']}\n"
        else:
            shown = "none" if content_type is None else repr(content_type.decode("latin-1"))
            status, text = 415, f"unsupported content-type {shown}: gRPC requests are application/grpc\n"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": text.encode(), "more_body": False})

    def _watch(self) -> CallWatch:
        loop = asyncio.get_running_loop()
        watch = self._watches.get(loop)
        if watch is None:
            watch = self._watches[loop] = CallWatch(self._tick_s, self._poll_s)
        return watch

    # ------------------------------------------------------------------------------- lifespan

    async def _lifespan(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Build the services on this event loop at startup; close them at shutdown."""
        await receive()  # lifespan.startup
        follow_launcher()  # under pyvoy: this loop lives as long as Envoy, which stops when its launcher dies
        closer = None
        try:
            if self._services is not None:
                methods, closer = await self._open_services()
                state = scope.get("state")
                if state is None:
                    raise RuntimeError("the ASGI server gives lifespan no state to keep the services in")
                state[_STATE_TABLE] = self._index(methods)
        except BaseException as error:
            log.exception("the gRPC services failed to start")
            await send({"type": "lifespan.startup.failed", "message": f"{type(error).__name__}: {error}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            if closer is not None:
                await closer()
        except Exception as error:
            log.exception("the gRPC services failed to stop")
            await send({"type": "lifespan.shutdown.failed", "message": f"{type(error).__name__}: {error}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _open_services(self):
        factory = resolve(self._services)
        built = factory() if self._argument is None else factory(self._argument)
        if hasattr(built, "__aenter__"):
            methods = await built.__aenter__()
            return list(methods), partial(built.__aexit__, None, None, None)
        if inspect.isawaitable(built):
            built = await built
        return list(built), None


def _shielded(function: Callable) -> Callable:
    """`function` (ASGI receive or send) with what it returns shielded from cancelling the caller."""

    def shielded(*args):
        pending = function(*args)  # pyvoy: a loop future, or an awaitable that is already complete
        return asyncio.shield(pending) if isinstance(pending, asyncio.Future) else pending

    return shielded


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except (Exception, asyncio.CancelledError):
        pass
