"""One Triton backend: its channel, its multiplexed inference streams, its health and its load."""

from __future__ import annotations

import enum
import itertools
import logging
from typing import Callable

import grpc

from gateway.errors import BackendError, DeadlineExceeded, Unavailable
from gateway.protocol import INFERENCE_SERVICE, pb
from gateway.upstream.config import UpstreamConfig
from gateway.upstream.stream import InferStream, StreamClosed

log = logging.getLogger(__name__)

class Health(enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Backend:
    """A Triton server reached over one grpc.aio channel.

    `outstanding` counts requests sent and not yet answered: the router's power-of-two-choices
    reads it. `ready_models` is what the last health check saw in the backend's RepositoryIndex.
    """

    def __init__(self, address: str, pool: str, config: UpstreamConfig) -> None:
        self.address = address
        self.pool = pool
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            # A backend that comes back should be found by the next health check, not after
            # gRPC's default reconnect backoff (up to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # Each backend gets its own connection even when addresses repeat across pools.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self._streams = [InferStream(self.channel, address, self._stream_broke) for _ in range(config.streams_per_backend)]
        self._stream_cycle = itertools.cycle(self._streams)
        self._unary_methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.health = Health.UNKNOWN
        self.health_detail = "not checked yet"  # why it is in its health state (shown in Gateway.snapshot)
        self.failed_checks = 0  # consecutive failed active checks
        self.ready_models: frozenset[tuple[str, str]] = frozenset()
        self.outstanding = 0
        self.served = 0
        self.failed = 0
        self.on_change: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return (
            f"<Backend {self.address} pool={self.pool} {self.health.value} "
            f"outstanding={self.outstanding} served={self.served} failed={self.failed}>"
        )

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY

    def serves(self, model: str, version: str) -> bool:
        return (model, version) in self.ready_models or (not version and (model, "") in self.ready_models)

    # ---- health ------------------------------------------------------------------------------

    def mark(self, health: Health, detail: str, ready_models: frozenset[tuple[str, str]] | None = None) -> None:
        changed = health is not self.health
        if ready_models is not None and ready_models != self.ready_models:
            self.ready_models = ready_models
            changed = True
        if health is not self.health:
            level = logging.INFO if health is Health.HEALTHY else logging.WARNING
            log.log(level, "backend %s (%s): %s -> %s: %s", self.address, self.pool, self.health.value, health.value, detail)
        self.health = health
        self.health_detail = detail
        if changed:
            self.on_change()

    def _stream_broke(self, reason: str) -> None:
        # Passive ejection: a broken stream takes the backend out of rotation at once; the next
        # successful health check puts it back.
        self.mark(Health.UNHEALTHY, reason)

    # ---- calls -------------------------------------------------------------------------------

    def _unary(self, method: str, response_type: type) -> grpc.aio.UnaryUnaryMultiCallable:
        callable_ = self._unary_methods.get(method)
        if callable_ is None:
            callable_ = self.channel.unary_unary(
                f"/{INFERENCE_SERVICE}/{method}",
                request_serializer=lambda message: message.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            self._unary_methods[method] = callable_
        return callable_

    async def call(self, method: str, request, response_type: type, timeout: float | None, metadata=None):
        """A unary RPC on this backend; gRPC failures become BackendError/Unavailable."""
        try:
            return await self._unary(method, response_type)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise translate_rpc_error(error, self.address) from None

    async def infer(self, request, *, decoupled: bool = False):
        """Send one ModelInferRequest over a stream; return its ModelInferResponse.

        The request's id is overwritten (the stream owns correlation); the caller restores it.
        """
        stream = next(self._stream_cycle)
        self.outstanding += 1
        entry = None
        try:
            entry = stream.submit(request)
            response = await entry.future
            self.served += 1
            return response
        except BackendError:
            self.failed += 1
            raise
        finally:
            self.outstanding -= 1
            if entry is not None and not entry.future.done():
                stream.forget(request.id)

    async def infer_unary(self, request, timeout: float | None, metadata=None):
        """Send one ModelInferRequest as its own unary call (with call metadata, e.g. trace context,
        which the shared stream cannot carry per request); return its ModelInferResponse."""
        self.outstanding += 1
        try:
            response = await self.call("ModelInfer", request, pb.ModelInferResponse, timeout, metadata)
            self.served += 1
            return response
        except BackendError:
            self.failed += 1
            raise
        finally:
            self.outstanding -= 1

    async def infer_decoupled(self, request):
        """Send one request to a decoupled model; yield each ModelInferResponse as it arrives.

        Stops after the response flagged final (Triton's `triton_final_response`).
        """
        stream = next(self._stream_cycle)
        self.outstanding += 1
        stream_id = None
        finished = False
        try:
            entry = stream.submit(request, decoupled=True)
            stream_id = request.id
            while True:
                item = await entry.queue.get()
                if isinstance(item, StreamClosed):
                    finished = True
                    raise item.error
                yield item
                final = item.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    self.served += 1
                    return
        finally:
            self.outstanding -= 1
            if stream_id is not None and not finished:
                stream.forget(stream_id)

    async def close(self) -> None:
        for stream in self._streams:
            await stream.close()
        await self.channel.close(grace=None)


def translate_rpc_error(error: grpc.aio.AioRpcError, backend: str) -> Exception:
    code = error.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"backend {backend} is unavailable: {error.details()}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"backend {backend} did not answer before the deadline")
    return BackendError(code, error.details() or code.name, backend)
