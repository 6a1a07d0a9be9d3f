"""One Triton backend: its channel, its multiplexed inference streams, its HTTP pool, its health and its load."""

from __future__ import annotations

import enum
import itertools
import logging
import zlib
from typing import Callable, Mapping

import grpc

from gateway.errors import BACKEND_UNAVAILABLE, Abandoned, BackendError, DeadlineExceeded, Unavailable
from gateway.protocol import INFERENCE_SERVICE, parameter_value, pb
from gateway.upstream.config import UpstreamConfig, unix_socket_path
from gateway.upstream.http import HttpPool
from gateway.upstream.rest import RestInference
from gateway.upstream.stream import InferStream, StreamClosed

log = logging.getLogger(__name__)

class Health(enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # left DNS discovery: no new requests, those in flight finish


class Backend:
    """A Triton server reached over one grpc.aio channel, and over HTTP when `http_address` is given.

    With an HTTP address (config `upstream.transport: http`), `infer` sends requests over a pool of
    keep-alive HTTP connections to Triton's HTTP endpoint (gateway/upstream/rest.py), except those
    of a sequence, which keep the stream's order; decoupled models always ride the stream; health
    checks and metadata are gRPC calls either way.

    `outstanding` counts requests sent and not yet answered: the router's power-of-two-choices
    reads it. `ready_models` is what the last health check saw in the backend's RepositoryIndex.

    `routable` is what the router asks: healthy (active checks) and not ejected (passive outlier
    detection, gateway/upstream/outlier.py). A failure that says the backend could not answer
    (UNAVAILABLE, DEADLINE_EXCEEDED) counts toward `consecutive_failures`; an answer resets it;
    at `failure_limit` in a row, `on_outlier(self, reason)` is called (the fleet's detector).
    """

    def __init__(self, address: str, pool: str, config: UpstreamConfig, http_address: str | None = None) -> None:
        self.address = address
        self.pool = pool
        self.http_address = http_address
        self.rest: RestInference | None = None
        if http_address is not None:
            # Not validated beyond its form: a derived port that is wrong (or out of range) fails
            # to connect, and the health checks say so (the config may name placeholder hosts).
            unix_path = unix_socket_path(http_address)
            if unix_path is None:
                host, _, port = http_address.rpartition(":")
                host, port = host.strip("[]"), int(port)
            else:
                host, port = "", 0
            http_pool = HttpPool(
                host, port, max_connections=config.http_connections_per_backend,
                connect_timeout_s=config.http_connect_timeout_s, max_body_bytes=config.max_message_bytes,
                on_broken=self._connection_broke,
                ssl=None if config.tls is None else config.tls.ssl_context(),
                server_hostname=None if config.tls is None else config.tls.server_name,
                unix_path=unix_path,
            )
            self.rest = RestInference(http_pool, address)
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
        if config.tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            # One channel carries the streams, health checks and metadata: all of it over TLS.
            root, key, chain = config.tls.read()
            credentials = grpc.ssl_channel_credentials(root, key, chain)
            if config.tls.server_name:
                options.append(("grpc.ssl_target_name_override", config.tls.server_name))
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        # Decoupled requests ride streams of their own, never shared with other requests: Triton 2.51
        # (the wheel's) aborts (proto_buffer_writer.h "!byte_buffer->Valid()", or a corrupted heap)
        # when one ModelStreamInfer stream carries both, because its decoupled and its in-order write
        # paths can issue two writes on the stream at once.
        self._streams = [InferStream(self.channel, address, self._stream_broke) for _ in range(config.streams_per_backend)]
        self._decoupled_streams = [InferStream(self.channel, address, self._stream_broke)
                                   for _ in range(config.streams_per_backend)]
        self._cycles = {False: itertools.cycle(self._streams), True: itertools.cycle(self._decoupled_streams)}
        self._unary_methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.health = Health.UNKNOWN
        self.health_detail = "not checked yet"  # why it is in its health state (shown in Gateway.snapshot)
        self.failed_checks = 0  # consecutive failed active checks
        self.ready_models: frozenset[tuple[str, str]] = frozenset()
        self.outstanding = 0
        self.served = 0
        self.failed = 0  # answered with an error, or failed to answer (UNAVAILABLE, DEADLINE_EXCEEDED)
        self.on_change: Callable[[], None] = lambda: None
        # Passive outlier detection (gateway/upstream/outlier.py owns the policy).
        self.ejected = False
        self.consecutive_failures = 0
        self.failure_limit = 1 << 62  # set by the outlier detector; effectively never without one
        self.on_outlier: Callable[["Backend", str], None] = lambda backend, reason: None
        self.checked_ok_at = 0.0  # monotonic time of the last successful active health check

    def __repr__(self) -> str:
        return (
            f"<Backend {self.address} pool={self.pool} {self.health.value} "
            f"outstanding={self.outstanding} served={self.served} failed={self.failed}>"
        )

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY

    @property
    def routable(self) -> bool:
        """Healthy and not ejected: the router may send new requests here."""
        return self.health is Health.HEALTHY and not self.ejected

    def _failed_to_answer(self, error: Exception) -> None:
        """An outright failure (no answer): count it; enough in a row make the backend an outlier."""
        self.failed += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.failure_limit and not isinstance(error, Abandoned):
            self.on_outlier(self, f"{self.consecutive_failures} failures in a row, the last: {error}")

    def abandon_pending(self, reason: str) -> int:
        """Fail every request pending here with Abandoned (retryable elsewhere): the backend was
        ejected, so what waits on it is moved instead of waiting out its deadline. Returns how many."""
        failed = 0
        if self.rest is not None:
            failed += self.rest.pool.abandon(reason)
        for stream in (*self._streams, *self._decoupled_streams):
            failed += stream.abandon(Abandoned(reason))
        return failed

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

    def _connection_broke(self, reason: str) -> None:
        # The same for HTTP: the backend refused a connection, or one broke under a request.
        self.mark(Health.UNHEALTHY, reason)

    @property
    def carries_trace_context(self) -> bool:
        """True when `infer(…, trace_context=…)` carries the context to Triton on its own
        (HTTP headers per request); else a traced request needs `infer_unary` (gRPC metadata)."""
        return self.rest is not None

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

    async def infer(self, request, *, trace_context: Mapping[str, str] | None = None):
        """Send one ModelInferRequest; return its ModelInferResponse.

        Over HTTP (when configured; `trace_context` becomes request headers), else over a stream,
        where the request's id is overwritten (the stream owns correlation) and the caller
        restores it. A request of a sequence always rides the stream, whose order is the order
        Triton sees.
        """
        rest = self.rest
        if rest is not None and "sequence_id" not in request.parameters:
            self.outstanding += 1
            try:
                response = await rest.infer(request, trace_context)
                self.served += 1
                self.consecutive_failures = 0
                return response
            except BackendError:
                self.failed += 1
                self.consecutive_failures = 0  # an answer, though an error: the backend is up
                raise
            except (Unavailable, DeadlineExceeded) as error:
                self._failed_to_answer(error)
                raise
            finally:
                self.outstanding -= 1
        if trace_context:  # the stream cannot carry it per request: a unary call can
            return await self.infer_unary(request, None, tuple(trace_context.items()))
        stream = self._stream_for(request)
        self.outstanding += 1
        entry = None
        try:
            entry = stream.submit(request)
            response = await entry.future
            self.served += 1
            self.consecutive_failures = 0
            return response
        except BackendError:
            self.failed += 1
            self.consecutive_failures = 0
            raise
        except (Unavailable, DeadlineExceeded) as error:
            self._failed_to_answer(error)
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

    def stream_requests(self) -> dict:
        """Requests submitted to each upstream stream: the shared ones, and the decoupled requests' own."""
        return {"shared": [stream.submitted for stream in self._streams],
                "decoupled": [stream.submitted for stream in self._decoupled_streams]}

    def _stream_for(self, request, decoupled: bool = False) -> InferStream:
        """The stream a request rides, among the decoupled requests' streams or the others: every
        request of one sequence the same one (a stream's order is the order Triton sees; two streams
        could reorder a client's pipelined steps), the others in turn."""
        streams = self._decoupled_streams if decoupled else self._streams
        sequence = request.parameters.get("sequence_id") if len(streams) > 1 else None
        if sequence is None:
            return next(self._cycles[decoupled])
        key = str(parameter_value(sequence)).encode()
        return streams[zlib.crc32(key) % len(streams)]  # not hash(), which is salted per process

    async def infer_decoupled(self, request):
        """Send one request to a decoupled model; yield each ModelInferResponse as it arrives.

        Stops after the response flagged final (Triton's `triton_final_response`).
        """
        stream = self._stream_for(request, decoupled=True)
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

    async def check_http(self, timeout: float) -> None:
        """Raise Unavailable unless the HTTP endpoint (when configured) answers ready in time."""
        if self.rest is not None:
            await self.rest.ready(timeout)

    async def close(self) -> None:
        if self.rest is not None:
            self.rest.pool.close()
        for stream in (*self._streams, *self._decoupled_streams):
            await stream.close()
        await self.channel.close(grace=None)


def translate_rpc_error(error: grpc.aio.AioRpcError, backend: str) -> Exception:
    code = error.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(BACKEND_UNAVAILABLE, detail=f"backend {backend}: {error.details()}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the backend did not answer before the deadline", detail=f"backend {backend}")
    return BackendError(code, error.details() or code.name, backend)
