"""Traces: a span per sampled request, with children for its wait in a batch queue and its backend call.

    infer {model}          SERVER  arrival → response; parent: the client's W3C traceparent, if any
      tensorgate.queue     INTERNAL  waiting for batch-mates (batched requests only)
      tensorgate.backend   CLIENT  the call to the Triton backend; its context goes to Triton

Sampling is decided once, on arrival, before any OpenTelemetry object exists: a request whose
client sent a `traceparent` follows the client's sampled flag (parent-based, as W3C asks); any
other is traced with probability `trace_sampling_ratio`. A request not traced costs a header lookup
and a random number.

A traced request's spans are not built through the SDK's Tracer: what they hold (ids, times,
attributes, status) is known to the gateway anyway, so each is made once, finished, as the SDK's
`ReadableSpan`, and handed to its BatchSpanProcessor. That is ~7 µs for a request's three spans
against ~57 µs through `start_span`/`set_attribute`/`end` (benchmarks/RESULTS.md, tenth session);
what reaches the collector is the same (tests/test_tracing.py reads it there). Ids are drawn as the
SDK's RandomIdGenerator draws them; the context goes to Triton as the W3C propagator writes it.

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

Spans are exported by the SDK's BatchSpanProcessor, from its own thread, over OTLP/gRPC, every
`trace_export_interval_s`: a collector that is down costs dropped spans, never a slower request.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.errors import GatewayError
from gateway.protocol import INFERENCE_SERVICE
from gateway.telemetry.config import TelemetryConfig

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_SCOPE = InstrumentationScope("tensorgate")
# The flags of a trace the gateway starts, as the SDK sets them: sampled, and its id random (W3C
# trace-context level 2); a client's trace keeps the client's random flag.
_ROOT_FLAGS = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_EMPTY_STATE = TraceState()
_ERROR = StatusCode.ERROR
_UNSET = Status(StatusCode.UNSET)
# W3C trace-context's traceparent, as the SDK's TraceContextTextMapPropagator reads it: lower-case
# hex; a later version may append fields, version 00 may not.
_TRACEPARENT_MAX = 512  # characters; longer is ignored, as the SDK's propagator ignores it
_TRACESTATE_MAX = 8192  # longer is dropped (the parent kept): it would travel on to Triton in every call
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")


class RequestTrace:
    """The server span of one traced request, still open: its context, its parent (the client's
    span, remote, or None) and the attributes it was started with."""

    __slots__ = ("context", "parent", "attributes")

    def __init__(self, context: SpanContext, parent: SpanContext | None, attributes: dict) -> None:
        self.context = context
        self.parent = parent
        self.attributes = attributes


def _client_context(call) -> SpanContext | bool | None:
    """The client's span context from its traceparent (and tracestate) when its sampled flag is
    set; False when it is not; None when the client sent none (or a malformed one: ignored, as W3C
    asks). `call.header` is one dict lookup on the ASGI
    engines: most requests carry no traceparent, and this is all they cost."""
    parent = call.header(TRACEPARENT)
    if parent is None:
        return None
    if not isinstance(parent, str):
        parent = parent.decode("ascii", "replace")
    match = _TRACEPARENT.match(parent) if len(parent) <= _TRACEPARENT_MAX else None
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id, flags = int(trace_id, 16), int(span_id, 16), int(flags, 16)
    if not trace_id or not span_id:
        return None
    if not flags & TraceFlags.SAMPLED:
        return False
    state = call.header(TRACESTATE)
    if state is not None:
        state = state if isinstance(state, str) else state.decode("ascii", "replace")
        state = TraceState.from_header([state]) if len(state) <= _TRACESTATE_MAX else None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags),
                       trace_state=state or _EMPTY_STATE)


class Tracing:
    """The tracer of one gateway: starts request traces, sends traced requests, ends the spans."""

    def __init__(self, config: TelemetryConfig, resource: Resource, rng: random.Random | None = None) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        self.ratio = config.trace_sampling_ratio
        self._random = (rng or random.Random()).random  # the sampling draws (seeded in tests)
        self._bits = random.Random().getrandbits  # the ids, as the SDK's RandomIdGenerator draws them
        self._resource = resource
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure,
                                    headers=dict(config.otlp_headers) or None)
        self._exporter = exporter
        self._processor = BatchSpanProcessor(exporter, schedule_delay_millis=config.trace_export_interval_s * 1e3)
        self._emit = self._processor.on_end
        # perf_counter_ns → wall clock (span times are Unix ns); the two clocks drift by far less
        # than a span's length over a gateway's life.
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.traced = 0

    def __repr__(self) -> str:
        return f"<Tracing ratio={self.ratio} traced={self.traced}>"

    def _wall(self, perf_ns: int) -> int:
        return perf_ns + self._wall_offset_ns

    def _span_id(self) -> int:
        span_id = self._bits(64)
        while not span_id:  # 0 is the invalid span id
            span_id = self._bits(64)
        return span_id

    def _finish(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind, attributes: dict,
                start_ns: int, end_ns: int, status: Status | None = None) -> None:
        """Hand a finished span to the processor (its thread exports it)."""
        self._emit(ReadableSpan(name, context, parent, self._resource, attributes, kind=kind,
                                status=status or _UNSET, start_time=start_ns, end_time=end_ns,
                                instrumentation_scope=_SCOPE))

    def _child(self, request_trace: RequestTrace) -> SpanContext:
        parent = request_trace.context
        return SpanContext(parent.trace_id, self._span_id(), is_remote=False, trace_flags=parent.trace_flags,
                           trace_state=parent.trace_state)

    # -- arrival --------------------------------------------------------------------------------

    def start(self, entry, request, call, started_ns: int) -> RequestTrace | None:
        """Pipeline.trace_starter: the trace of a request, or None when it is not sampled. `call`:
        the call's headers (gateway/pipeline/contracts.py's CallHeaders), or None."""
        client = _client_context(call) if call is not None else None
        if client is None:
            if self._random() >= self.ratio:
                return None
            trace_id = self._bits(128)
            while not trace_id:
                trace_id = self._bits(128)
            flags, state = _ROOT_FLAGS, _EMPTY_STATE
        elif client is False:  # the client's sampled flag is off: parent-based, not traced
            return None
        else:
            trace_id, state = client.trace_id, client.trace_state
            flags = TraceFlags(TraceFlags.SAMPLED | (client.trace_flags & TraceFlags.RANDOM_TRACE_ID))
        self.traced += 1
        context = SpanContext(trace_id, self._span_id(), is_remote=False, trace_flags=flags, trace_state=state)
        return RequestTrace(context, client, {
            "rpc.system": "grpc", "rpc.service": INFERENCE_SERVICE,
            "tensorgate.model": entry.name, "tensorgate.model.version": entry.version,
            "tensorgate.request.id": request.id,
        })

    # -- the backend call -----------------------------------------------------------------------

    async def send(self, backend, exchange, deadline: float | None):
        """DirectDispatcher.traced_send: the backend call of a traced exchange (a request, or a
        batch with traced members), as a unary call that carries the backend span's context."""
        traced = [m.trace for m in exchange.members if m.trace is not None] or [exchange.trace]
        spans = [(request_trace, self._child(request_trace)) for request_trace in traced]
        attributes = {
            "rpc.system": "grpc", "rpc.service": INFERENCE_SERVICE, "rpc.method": "ModelInfer",
            "server.address": backend.address, "tensorgate.pool": backend.pool,
            "tensorgate.route": exchange.route or "",
            "tensorgate.batch.rows": exchange.batch_rows, "tensorgate.batch.requests": len(exchange.members) or 1,
        }
        first = spans[0][1]
        carrier = {TRACEPARENT: f"00-{first.trace_id:032x}-{first.span_id:016x}-{first.trace_flags:02x}"}
        if first.trace_state:
            carrier[TRACESTATE] = first.trace_state.to_header()
        request = exchange.request
        status = None
        started = time.time_ns()
        try:
            if backend.carries_trace_context:  # HTTP upstream: the context is a header of this request
                return await backend.infer(request, trace_context=carrier)
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return await backend.infer_unary(request, timeout, tuple(carrier.items()))
        except GatewayError as error:
            status = Status(_ERROR, error.message)
            attributes["rpc.response.status_code"] = error.code.name
            raise
        finally:
            ended = time.time_ns()
            for request_trace, context in spans:
                self._finish("tensorgate.backend", context, request_trace.context, SpanKind.CLIENT, attributes,
                             started, ended, status)

    # -- the end --------------------------------------------------------------------------------

    def observer(self, exchange, response, error) -> None:
        """Pipeline observer: the queue span and the request span, for traced requests."""
        request_trace = exchange.trace
        if request_trace is None:
            return
        try:
            context = request_trace.context
            if exchange.batch_rows and exchange.upstream_started_ns:
                queue_end = exchange.upstream_started_ns
                self._finish("tensorgate.queue", self._child(request_trace), context, SpanKind.INTERNAL,
                             {"tensorgate.batch.rows": exchange.batch_rows},
                             self._wall(queue_end - exchange.queued_ns), self._wall(queue_end))
            if exchange.entry.signature.decoupled and exchange.backend is not None:
                # Decoupled requests ride the stream: record their backend call after the fact.
                self._finish("tensorgate.backend", self._child(request_trace), context, SpanKind.CLIENT,
                             {"server.address": exchange.backend.address, "tensorgate.pool": exchange.backend.pool},
                             self._wall(exchange.upstream_started_ns),
                             self._wall(exchange.upstream_started_ns + exchange.upstream_ns))
            attributes = request_trace.attributes
            if exchange.backend is not None:
                attributes["tensorgate.backend"] = exchange.backend.address
                attributes["tensorgate.pool"] = exchange.backend.pool
            if exchange.route:
                attributes["tensorgate.route"] = exchange.route
            attributes["rpc.response.status_code"] = "OK" if error is None else error.code.name
            self._finish(f"infer {exchange.entry.name}", context, request_trace.parent, SpanKind.SERVER, attributes,
                         self._wall(exchange.started_ns), self._wall(exchange.started_ns + exchange.elapsed_ns),
                         None if error is None else Status(_ERROR, error.message))
        except Exception:  # a tracing failure must never fail the request
            log.exception("tracing: ending the span of a request failed")

    def close(self, flush_s: float = 2.0) -> None:
        """Flush what is queued, for at most `flush_s`, then stop. An unreachable or hanging
        collector must not hold up shutdown: the SDK's force_flush ignores its timeout (1.45: each
        queued batch of 512 spans retries for up to the exporter's 10 s), so the flush runs in a
        thread of its own, and shutting the exporter down ends its retries and its call in flight."""
        flush = threading.Thread(target=self._processor.force_flush, name="tensorgate-span-flush", daemon=True)
        flush.start()
        flush.join(flush_s)
        if flush.is_alive():
            self._exporter.shutdown()
            flush.join(flush_s)
        self._processor.shutdown()
