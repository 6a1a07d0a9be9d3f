"""The grpc.aio engine: serves Method tables with grpcio's asyncio server, raw bytes in and out.

Handlers get serialized messages (no grpcio (de)serializer: the services parse once, with upb, and a
message that does not parse is their INVALID_ARGUMENT, not grpcio's opaque INTERNAL). Whatever a
handler raises ends the call with `status_of`'s status.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import AsyncIterator, Callable

import grpc

from gateway.server.rpc import Call, Method, status_of, trailers_of

# grpc core's server arguments (src/core/server/server.h); grpcio passes unknown keys through.
PENDING_CALLS_SOFT = "grpc.server.max_pending_requests"
PENDING_CALLS_HARD = "grpc.server.max_pending_requests_hard_limit"
OVERLOAD_PROTECTION = "grpc.http.overload_protection"


def _call(context) -> Call:
    remaining = context.time_remaining()
    return Call(
        None if remaining is None else time.monotonic() + remaining,
        context.invocation_metadata,  # read only if a handler asks
        context.peer,
    )


def _unary(method: Method) -> Callable:
    handler = method.handler
    if method.gate is not None:
        return _gated_unary(method)

    async def serve(raw: bytes, context) -> bytes:
        try:
            return await handler(raw, _call(context))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await context.abort(*status_of(error, method.path), trailers_of(error))

    return serve


def _gated_unary(method: Method) -> Callable:
    """A unary method whose request messages are admitted by `method.gate` (grpc has the whole
    message before the handler runs: it is admitted then, by its size)."""
    handler, gate = method.handler, method.gate

    async def serve(raw: bytes, context) -> bytes:
        size = len(raw)
        try:
            gate.admit(size)
        except Exception as error:
            await context.abort(*status_of(error, method.path), trailers_of(error))
        try:
            return await handler(raw, _call(context))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await context.abort(*status_of(error, method.path), trailers_of(error))
        finally:
            gate.release(size)

    return serve


def _streaming(method: Method) -> Callable:
    handler = method.handler

    async def serve(requests: AsyncIterator[bytes], context):
        try:
            async for response in handler(requests, _call(context)):
                yield response
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await context.abort(*status_of(error, method.path), trailers_of(error))

    return serve


def generic_handlers(methods: list[Method]) -> list[grpc.GenericRpcHandler]:
    """One grpc generic handler per service of `methods`."""
    by_service: dict[str, dict] = defaultdict(dict)
    for method in methods:
        service, _, name = method.path.lstrip("/").rpartition("/")
        if method.streaming:
            by_service[service][name] = grpc.stream_stream_rpc_method_handler(_streaming(method))
        else:
            by_service[service][name] = grpc.unary_unary_rpc_method_handler(_unary(method))
    return [grpc.method_handlers_generic_handler(service, handlers) for service, handlers in by_service.items()]


class GrpcioEngine:
    """A grpc.aio server on `listen` ("host:port"; port 0 picks one) serving `methods`.

    credentials          grpc.ssl_server_credentials for TLS (mutual TLS when they require client
                         certificates); None: plaintext
    max_concurrent_streams  HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection; None: grpc's default
    reuse_port           SO_REUSEPORT, so several processes (gateway/workers/) serve one port; off, a
                         second server on a port in use fails to start instead of sharing it unnoticed
    """

    def __init__(self, listen: str, methods: list[Method], max_receive_bytes: int, max_send_bytes: int,
                 *, credentials: grpc.ServerCredentials | None = None,
                 max_concurrent_streams: int | None = None, reuse_port: bool = False,
                 max_pending_calls: int = 65536) -> None:
        self.listen = listen
        self._credentials = credentials
        options = [
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Calls received but not yet taken by grpc.aio (one at a time) wait in grpc core; past
            # its defaults (random early drop from 1,000, all from 3,000) it cancels them: CANCELLED,
            # unlogged, 6-9 % of 2,000 concurrent calls on one channel. Soft = hard: no random drop
            # below the limit (ServerConfig.max_pending_calls).
            (PENDING_CALLS_SOFT, max_pending_calls),
            (PENDING_CALLS_HARD, max_pending_calls),
        ]
        if max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
            # grpc core's "overload protection" (on by default) counts streams not yet freed after
            # they closed against the limit and refuses new ones (REFUSED_STREAM → UNAVAILABLE) that
            # the client, honouring the limit, sent: 604 of 2,000 concurrent calls on one channel
            # failed. Off, the limit is HTTP/2's: streams open at once, which clients queue behind.
            options.append((OVERLOAD_PROTECTION, 0))
        self._server = grpc.aio.server(options=options)
        self._server.add_generic_rpc_handlers(generic_handlers(methods))
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"<GrpcioEngine {self.listen} port={self.port}>"

    async def start(self) -> int:
        """Bind and serve; returns the port."""
        if self._credentials is None:
            port = self._server.add_insecure_port(self.listen)
        else:
            port = self._server.add_secure_port(self.listen, self._credentials)
        if not port:
            raise OSError(f"cannot listen on {self.listen}")
        await self._server.start()
        self.port = port
        return port

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new calls, give calls in flight `grace_s` to finish, then cancel the rest."""
        await self._server.stop(grace_s)

    async def wait(self) -> None:
        await self._server.wait_for_termination()
