"""Traces: a span per sampled request, with children for its wait in a batch queue and its backend call.

    infer {model}          SERVER  arrival → response; parent: the client's W3C traceparent, if any
      tensorgate.queue     INTERNAL  waiting for batch-mates (batched requests only)
      tensorgate.backend   CLIENT  the call to the Triton backend; its context goes to Triton

Sampling is decided once, on arrival, before any OpenTelemetry object exists: a request whose
client sent a `traceparent` follows the client's sampled flag (parent-based, as W3C asks); any
other is traced with probability `trace_sampling_ratio`. A request not traced costs a header lookup
and a random number; the SDK is only called for traced ones.

Carrying the context to Triton: with the HTTP upstream (`upstream.transport: http`) a traced
request (or a batch holding one) goes the way every request goes, with the backend span's
`traceparent` as a header of its own HTTP request, which Triton's OpenTelemetry tracing reads.
With the stream upstream, one ModelStreamInfer stream per backend is shared by many requests, and
Triton reads trace context from a call's gRPC metadata — per stream, not per message. So there a
traced request is sent as a unary ModelInfer with
the backend span's `traceparent` in its metadata, where Triton's own OpenTelemetry tracing
(`--trace-config mode=opentelemetry`) makes its spans children of the gateway's (a model that wants
the context itself gets it from Triton's `--grpc-header-forward-pattern=^traceparent$`, as a request
parameter). Decoupled models keep the stream (a unary call cannot carry their responses): their
backend span is recorded, but the context stops at the gateway.

Spans are exported by the SDK's BatchSpanProcessor, from its own thread, over OTLP/gRPC: a
collector that is down costs dropped spans, never a slower request.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.errors import GatewayError
from gateway.protocol import INFERENCE_SERVICE
from gateway.telemetry.config import TelemetryConfig

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()


class RequestTrace:
    """The live span of one traced request; its children are made from the Exchange's timings."""

    __slots__ = ("span",)

    def __init__(self, span) -> None:
        self.span = span


def _client_sampled(call) -> tuple[bool, dict] | None:
    """(sampled flag, carrier) of the client's traceparent, or None when it sent none (or a
    malformed one). `call.header` is one dict lookup on the ASGI engines: most requests carry no
    traceparent, and this is all they cost."""
    parent = call.header(TRACEPARENT)
    if parent is None:
        return None
    if not isinstance(parent, str):
        parent = parent.decode("ascii", "replace")
    # version-traceid(32)-spanid(16)-flags(2); anything else is ignored, as W3C asks.
    if len(parent) < 55 or parent[2] != "-" or parent[35] != "-" or parent[52] != "-":
        return None
    try:
        flags = int(parent[53:55], 16)
    except ValueError:
        return None
    carrier = {TRACEPARENT: parent}
    state = call.header(TRACESTATE)
    if state is not None:
        carrier[TRACESTATE] = state if isinstance(state, str) else state.decode("ascii", "replace")
    return bool(flags & 1), carrier


class Tracing:
    """The tracer of one gateway: starts request traces, sends traced requests, ends the spans."""

    def __init__(self, config: TelemetryConfig, resource: Resource, rng: random.Random | None = None) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        self.ratio = config.trace_sampling_ratio
        self._random = (rng or random.Random()).random
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure,
                                    headers=dict(config.otlp_headers) or None)
        self._exporter = exporter
        # A provider of our own (not the global one): the gateway is a library too, tests run several.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=config.trace_export_interval_s * 1e3))
        self.tracer = self.provider.get_tracer("tensorgate")
        # perf_counter_ns → wall clock (span times are Unix ns); the two clocks drift by far less
        # than a span's length over a gateway's life.
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.traced = 0

    def __repr__(self) -> str:
        return f"<Tracing ratio={self.ratio} traced={self.traced}>"

    def _wall(self, perf_ns: int) -> int:
        return perf_ns + self._wall_offset_ns

    # -- arrival --------------------------------------------------------------------------------

    def start(self, entry, request, call, started_ns: int) -> RequestTrace | None:
        """Pipeline.trace_starter: the trace of a request, or None when it is not sampled. `call`:
        the call's headers (gateway/pipeline/contracts.py's CallHeaders), or None."""
        client = _client_sampled(call) if call is not None else None
        if client is None:
            if self._random() >= self.ratio:
                return None
            context = None
        else:
            sampled, carrier = client
            if not sampled:
                return None
            context = _PROPAGATOR.extract(carrier)
        self.traced += 1
        span = self.tracer.start_span(
            f"infer {entry.name}", context=context, kind=SpanKind.SERVER, start_time=self._wall(started_ns),
            attributes={
                "rpc.system": "grpc", "rpc.service": INFERENCE_SERVICE,
                "tensorgate.model": entry.name, "tensorgate.model.version": entry.version,
                "tensorgate.request.id": request.id,
            },
        )
        return RequestTrace(span)

    # -- the backend call -----------------------------------------------------------------------

    async def send(self, backend, exchange, deadline: float | None):
        """DirectDispatcher.traced_send: the backend call of a traced exchange (a request, or a
        batch with traced members), as a unary call that carries the backend span's context."""
        traced = [m for m in exchange.members if m.trace is not None] or [exchange]
        spans = [
            self.tracer.start_span(
                "tensorgate.backend", context=trace.set_span_in_context(member.trace.span), kind=SpanKind.CLIENT,
                attributes={
                    "rpc.system": "grpc", "rpc.service": INFERENCE_SERVICE, "rpc.method": "ModelInfer",
                    "server.address": backend.address, "tensorgate.pool": backend.pool,
                    "tensorgate.route": exchange.route or "",
                    "tensorgate.batch.rows": exchange.batch_rows, "tensorgate.batch.requests": len(exchange.members) or 1,
                },
            )
            for member in traced
        ]
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(spans[0]))
        request = exchange.request
        try:
            if backend.carries_trace_context:  # HTTP upstream: the context is a header of this request
                return await backend.infer(request, trace_context=carrier)
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return await backend.infer_unary(request, timeout, tuple(carrier.items()))
        except GatewayError as error:
            for span in spans:
                span.set_status(Status(StatusCode.ERROR, error.message))
                span.set_attribute("rpc.response.status_code", error.code.name)
            raise
        finally:
            for span in spans:
                span.end()

    # -- the end --------------------------------------------------------------------------------

    def observer(self, exchange, response, error) -> None:
        """Pipeline observer: the queue span and the request span's end, for traced requests."""
        request_trace = exchange.trace
        if request_trace is None:
            return
        try:
            span = request_trace.span
            parent = trace.set_span_in_context(span)
            if exchange.batch_rows and exchange.upstream_started_ns:
                queue_end = exchange.upstream_started_ns
                queue = self.tracer.start_span("tensorgate.queue", context=parent,
                                               start_time=self._wall(queue_end - exchange.queued_ns),
                                               attributes={"tensorgate.batch.rows": exchange.batch_rows})
                queue.end(end_time=self._wall(queue_end))
            if exchange.entry.signature.decoupled and exchange.backend is not None:
                # Decoupled requests ride the stream: record their backend call after the fact.
                call = self.tracer.start_span("tensorgate.backend", context=parent, kind=SpanKind.CLIENT,
                                              start_time=self._wall(exchange.upstream_started_ns),
                                              attributes={"server.address": exchange.backend.address,
                                                          "tensorgate.pool": exchange.backend.pool})
                call.end(end_time=self._wall(exchange.upstream_started_ns + exchange.upstream_ns))
            if exchange.backend is not None:
                span.set_attribute("tensorgate.backend", exchange.backend.address)
                span.set_attribute("tensorgate.pool", exchange.backend.pool)
            if exchange.route:
                span.set_attribute("tensorgate.route", exchange.route)
            code = "OK" if error is None else error.code.name
            span.set_attribute("rpc.response.status_code", code)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error.message))
            span.end(end_time=self._wall(exchange.started_ns + exchange.elapsed_ns))
        except Exception:  # a tracing failure must never fail the request
            log.exception("tracing: ending the span of a request failed")

    def close(self, flush_s: float = 2.0) -> None:
        """Flush what is queued, for at most `flush_s`, then stop. An unreachable or hanging
        collector must not hold up shutdown: the SDK's force_flush ignores its timeout (1.45: each
        queued batch of 512 spans retries for up to the exporter's 10 s), so the flush runs in a
        thread of its own, and shutting the exporter down ends its retries and its call in flight."""
        flush = threading.Thread(target=self.provider.force_flush, name="tensorgate-span-flush", daemon=True)
        flush.start()
        flush.join(flush_s)
        if flush.is_alive():
            self._exporter.shutdown()
            flush.join(flush_s)
        self.provider.shutdown()

