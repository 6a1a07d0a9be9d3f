"""Traces, end to end: a stock client's W3C traceparent → the gateway's spans → Triton's own spans.

Real components only: a Triton from the wheel with its OpenTelemetry tracing on, exporting OTLP/HTTP
to a receiver here; the gateway exporting OTLP/gRPC to the collector's own TraceService; stock
tritonclient calls with a `traceparent` header. Between the gateway and Triton sits a gRPC proxy
(tests/servers.py) that forwards everything and records each call's metadata: what the gateway
sends upstream is checked call by call, deterministically, and Triton's own spans on top of that.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from gateway.bench.otlp_receiver import GrpcReceiver, HttpTraceReceiver
from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import GatewayThread
from tests.conftest import gateway_on
from tests.servers import HangingServer, UpstreamProxy
from tests.waiting import wait_until

SERVER, CLIENT = 2, 3  # OTLP SpanKind values


@pytest.fixture(scope="module")
def triton_spans(tmp_path_factory):
    receiver = HttpTraceReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced_triton(triton_spans, tmp_path_factory):
    """A Triton that traces every request that comes with trace context, and exports its spans fast."""
    server = LocalTriton(
        default_model_repository(), name="traced", log_dir=tmp_path_factory.mktemp("traced-triton"),
        extra_args=[
            "--trace-config=mode=opentelemetry", "--trace-config=rate=1", "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={triton_spans.url}",
            "--trace-config=opentelemetry,bsp_schedule_delay=100",
        ],
    ).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(traced_triton):
    """The traced Triton as the gateway sees it: through a proxy that records every call's metadata."""
    server = UpstreamProxy(traced_triton.grpc_address)
    yield server
    server.close()


@pytest.fixture
def collector():
    receiver = GrpcReceiver()
    yield receiver
    receiver.stop()


def _config(backend: LocalTriton | UpstreamProxy, endpoint: str, ratio: float, **batching) -> dict:
    address = backend.address if isinstance(backend, UpstreamProxy) else backend.grpc_address
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [address]}},
        "telemetry": {"otlp_endpoint": endpoint, "otlp_interval_s": 0.5, "trace_sampling_ratio": ratio,
                      "trace_export_interval_s": 0.5},
        # gRPC upstream, where the trace context rides call metadata (the proxy records it); the
        # HTTP transport's traceparent header is tested in test_upstream_http_triton.py.
        "upstream": {"transport": "grpc-stream"},
    }
    if batching:
        config["batching"] = {"default": batching}
    return config


def _inputs(value: float = 1.0, rows: int = 1):
    tensor = triton_grpc.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 16), value, dtype=np.float32))
    return [tensor]


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def _wait_spans(receiver, predicate, what: str, timeout: float = 15.0) -> list:
    """The receiver's spans once `predicate(spans)` holds."""
    return wait_until(receiver.spans, what, timeout, step=0.1, accept=predicate)


def _of_trace(spans: list, trace_id: str) -> list:
    return [span for span in spans if span.trace_id == trace_id]


def _parsed(traceparent: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a W3C traceparent (the SDK's own trace ids also set
    the "random" flag, 02)."""
    if traceparent is None:
        return None
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00", traceparent
    return trace_id, span_id, bool(int(flags, 16) & 1)


def _traceparents_sent_upstream(proxy: UpstreamProxy) -> list[str]:
    """The traceparent of every unary ModelInfer the gateway sent (None where it sent none)."""
    return [metadata.get("traceparent") for metadata in proxy.metadata_of("ModelInfer")]


def _assert_each_backend_call_carried_its_span(proxy: UpstreamProxy, backend_spans: list) -> None:
    """Every traced backend call went upstream as its own ModelInfer whose traceparent names the
    gateway's backend span (sampled); no other inference call carried a context; the shared stream
    carried none."""
    sent = [_parsed(header) for header in _traceparents_sent_upstream(proxy)]
    want = [(span.trace_id, span.span_id, True) for span in backend_spans]
    assert sorted(sent, key=str) == sorted(want), (sent, want)
    assert all("traceparent" not in metadata for metadata in proxy.metadata_of("ModelStreamInfer"))


def _assert_triton_spans_under_backend_calls(triton_spans, backend_spans: list, forwarded: int, window: tuple[int, int],
                                             require_child: bool = True) -> None:
    """Triton's request spans of this test's window: each either a child of one of the gateway's
    backend spans (one per call) or a parentless root — Triton 2.51 exports a root span, not a child,
    for a share of requests that came with context (3–15 % seen here, also calling it directly), and
    for every request that came without one. Matched + roots = the inference messages forwarded."""
    wanted = {span.span_id: span.trace_id for span in backend_spans}

    def in_window(spans):
        return [s for s in spans if s.name == "InferRequest" and window[0] <= s.start_ns <= window[1]]

    spans = _wait_spans(triton_spans, lambda s: len(in_window(s)) >= forwarded,
                        f"{forwarded} Triton request spans", timeout=10)
    found = in_window(spans)
    children = [s for s in found if s.parent_span_id]
    roots = [s for s in found if not s.parent_span_id]
    assert all(wanted.get(c.parent_span_id) == c.trace_id for c in children), (children, wanted)
    assert len({c.parent_span_id for c in children}) == len(children), children  # one per backend call
    assert len(children) + len(roots) == forwarded, (children, roots, forwarded)
    # With six calls or more, all six roots would happen about once in a million runs.
    assert children or not require_child, "no Triton span under any of the gateway's backend spans"


# The ASGI engines (h2, envoy) look the header up in the request's headers, grpc.aio's in its metadata.
@pytest.mark.parametrize("door", ["h2", "grpcio-uvloop"])
def test_client_traceparent_is_parent_of_gateway_span_and_reaches_triton(proxy, triton_spans, collector, door):
    config = _config(proxy, f"127.0.0.1:{collector.port}", ratio=1e-9)  # only client-sampled requests
    header, trace_id, client_span = _traceparent()
    more = [_traceparent() for _ in range(5)]  # more traced requests, so Triton's side shows some children
    with gateway_on(door, config) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        window_start = time.time_ns()
        try:
            result = client.infer("simple_scale", _inputs(3.0), headers={"traceparent": header})
            assert np.all(result.as_numpy("OUTPUT0") == 6.0)
            for other, _, _ in more:
                client.infer("simple_scale", _inputs(), headers={"traceparent": other})
            unsampled, unsampled_trace, _ = _traceparent(sampled=False)
            client.infer("simple_scale", _inputs(), headers={"traceparent": unsampled})
            client.infer("simple_scale", _inputs())  # no context: not sampled at a ratio of 1e-9
        finally:
            client.close()
        window = (window_start, time.time_ns())
        traces = [trace_id] + [other_trace for _, other_trace, _ in more]
        # Each trace's backend span is exported before its request span (the request ends after its
        # backend call): wait for both of every trace, which may come in different exports.
        spans = _wait_spans(collector, lambda s: all({"tensorgate.backend", "infer simple_scale"}
                                                     <= {x.name for x in _of_trace(s, t)} for t in traces),
                            "the gateway's spans")
        assert not gateway.loop_errors

    ours = _of_trace(spans, trace_id)
    [request_span] = [s for s in ours if s.name == "infer simple_scale"]
    assert request_span.parent_span_id == client_span  # the client's span is the parent
    assert request_span.kind == SERVER
    assert request_span.attributes["tensorgate.model"] == "simple_scale"
    assert request_span.attributes["tensorgate.backend"] == proxy.address
    assert request_span.attributes["rpc.response.status_code"] == "OK"
    assert request_span.resource["service.name"] == "tensorgate"
    [backend_span] = [s for s in ours if s.name == "tensorgate.backend"]
    assert backend_span.parent_span_id == request_span.span_id
    assert backend_span.kind == CLIENT
    assert backend_span.attributes["server.address"] == proxy.address
    assert request_span.start_ns <= backend_span.start_ns <= backend_span.end_ns <= request_span.end_ns
    for queue_span in [s for s in ours if s.name == "tensorgate.queue"]:
        assert queue_span.parent_span_id == request_span.span_id
    # Only the sampled requests were traced: nothing for the unsampled traceparent, nor for the request without one.
    assert {s.trace_id for s in spans if s.name.startswith("infer ")} == set(traces)
    assert not _of_trace(spans, unsampled_trace)

    # Upstream, call by call: each of the six traced requests went to Triton with its backend span's
    # context; the two untraced ones rode the shared stream, without any.
    backend_spans = [s for s in spans if s.name == "tensorgate.backend"]
    assert len(backend_spans) == 6
    _assert_each_backend_call_carried_its_span(proxy, backend_spans)
    assert proxy.forwarded == 6 + 2
    # And Triton used it: its request spans are children of the gateway's backend spans.
    _assert_triton_spans_under_backend_calls(triton_spans, backend_spans, proxy.forwarded, window)


def test_stream_traceparent_applies_to_each_request_on_the_stream(proxy, triton_spans, collector):
    # Batching off: each request makes its own backend call (batches are the next test's).
    config = _config(proxy, f"127.0.0.1:{collector.port}", ratio=1e-9, enabled=False)
    header, trace_id, client_span = _traceparent()
    results: list = []
    sent = 6
    with GatewayThread(config) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        window_start = time.time_ns()
        try:
            client.start_stream(callback=lambda result, error: results.append((result, error)),
                                headers={"traceparent": header})
            for index in range(sent):
                client.async_stream_infer("simple_scale", _inputs(float(index)), request_id=str(index))
            client.stop_stream()
        finally:
            client.close()
        window = (window_start, time.time_ns())
        spans = _wait_spans(collector, lambda s: [x.name for x in _of_trace(s, trace_id)].count("tensorgate.backend") == sent
                            and [x.name for x in _of_trace(s, trace_id)].count("infer simple_scale") == sent,
                            f"{sent} backend spans and {sent} request spans")
    assert [error for _, error in results] == [None] * sent
    requests = [s for s in _of_trace(spans, trace_id) if s.name == "infer simple_scale"]
    assert sorted(s.attributes["tensorgate.request.id"] for s in requests) == [str(i) for i in range(sent)]
    assert all(s.parent_span_id == client_span for s in requests)
    # Per request, even though the client's context came once per stream: each went to Triton with its own.
    backend_spans = [s for s in _of_trace(spans, trace_id) if s.name == "tensorgate.backend"]
    _assert_each_backend_call_carried_its_span(proxy, backend_spans)
    assert proxy.forwarded == sent
    _assert_triton_spans_under_backend_calls(triton_spans, backend_spans, proxy.forwarded, window)


def test_a_failed_traced_request_carries_its_status_and_the_clients_tracestate(proxy, collector):
    """The spans of a request the backend fails say so (status ERROR, the gRPC code), and the
    client's tracestate and random flag travel on to Triton with the backend span's context, as
    the SDK's propagator writes them (W3C trace-context)."""
    config = _config(proxy, f"127.0.0.1:{collector.port}", ratio=1e-9, enabled=False)
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    header = f"00-{trace_id}-{client_span}-03"  # sampled, and its trace id random (level 2)
    mode = triton_grpc.InferInput("MODE", [1, 1], "INT32")
    mode.set_data_from_numpy(np.array([[2]], dtype=np.int32))  # fail_on_demand: an INVALID_ARG error response
    with GatewayThread(config) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        try:
            with pytest.raises(InferenceServerException, match="MODE 2 asked for INVALID_ARG"):
                client.infer("fail_on_demand", [*_inputs(), mode],
                             headers={"traceparent": header, "tracestate": "vendor=abc,other=1"})
        finally:
            client.close()
        spans = _wait_spans(collector, lambda s: {"infer fail_on_demand", "tensorgate.backend"}
                            <= {x.name for x in _of_trace(s, trace_id)}, "the failed request's spans")
        assert not gateway.loop_errors
    [request_span] = [s for s in spans if s.name == "infer fail_on_demand"]
    [backend_span] = [s for s in spans if s.name == "tensorgate.backend"]
    assert request_span.parent_span_id == client_span and backend_span.parent_span_id == request_span.span_id
    for span in (request_span, backend_span):
        assert span.status_code == 2  # STATUS_CODE_ERROR
        assert span.attributes["rpc.response.status_code"] == "INVALID_ARGUMENT"
    [sent] = proxy.metadata_of("ModelInfer")
    assert sent["traceparent"] == f"00-{trace_id}-{backend_span.span_id}-03"
    assert sent["tracestate"] == "vendor=abc,other=1"


@pytest.mark.parametrize(("traceparent", "expected"), [
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "sampled"),
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", "not sampled"),
    ("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later", "sampled"),  # a later version may add fields
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later", None),  # version 00 may not
    ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),  # version ff is invalid
    ("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", None),  # upper-case hex
    ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),  # all-zero trace id
    ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", None),  # all-zero span id
    ("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-" + "x" * 500, None),  # over 512 characters
])
def test_a_client_traceparent_is_read_as_the_sdk_propagator_reads_it(traceparent, expected):
    """W3C trace-context as OpenTelemetry's TraceContextTextMapPropagator reads it, on both kinds of
    call the engines hand over (headers by key on h2 and envoy, a metadata scan on grpc.aio)."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from gateway.server.rpc import Call
    from gateway.telemetry.tracing import _client_context

    sdk = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent})).get_span_context()
    for call in (Call(headers={b"traceparent": traceparent.encode()}), Call(metadata=(("traceparent", traceparent),))):
        context = _client_context(call)
        if expected is None:
            assert context is None and not sdk.is_valid
        elif expected == "not sampled":
            assert context is False and sdk.is_valid and not sdk.trace_flags.sampled
        else:
            assert (context.trace_id, context.span_id, context.trace_flags, context.is_remote) == (
                sdk.trace_id, sdk.span_id, sdk.trace_flags, True)


def test_a_tracestate_over_the_w3c_limit_is_dropped_and_the_parent_kept():
    from gateway.server.rpc import Call
    from gateway.telemetry.tracing import _client_context

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    long_state = ",".join(f"k{n}=" + "v" * 256 for n in range(32))  # 32 valid members, 8,341 characters
    assert len(long_state) > 8192
    context = _client_context(Call(headers={b"traceparent": parent.encode(), b"tracestate": long_state.encode()}))
    assert context.span_id == 0xB7AD6B7169203331 and len(context.trace_state) == 0
    context = _client_context(Call(headers={b"traceparent": parent.encode(), b"tracestate": b"vendor=abc"}))
    assert context.trace_state.to_header() == "vendor=abc"


class _FakeEntry:
    """The two fields Tracing.start reads of a ModelEntry."""

    name, version = "m", "1"


class _FakeRequest:
    id = ""


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_sampling_ratio_samples_exactly_the_draws_below_it(collector, ratio):
    """With a seeded RNG the sampled requests are known in advance: exactly those whose draw is below the ratio."""
    from opentelemetry.sdk.resources import Resource

    from gateway.telemetry.config import TelemetryConfig
    from gateway.telemetry.tracing import Tracing

    config = TelemetryConfig(otlp_endpoint=f"127.0.0.1:{collector.port}", trace_sampling_ratio=ratio)
    tracing = Tracing(config, Resource.create({}), rng=random.Random(7))
    try:
        sampled = [tracing.start(_FakeEntry, _FakeRequest, None, time.perf_counter_ns()) is not None for _ in range(1000)]
    finally:
        tracing.close()
    draws = random.Random(7)
    assert sampled == [draws.random() < ratio for _ in range(1000)]
    assert tracing.traced == sum(sampled)


def test_sampling_ratio_through_the_gateway(proxy, collector):
    """The gateway's sampler, seeded: the requests traced are exactly the draws below the ratio,
    each traced one has a root span of its own and went upstream with its context."""
    sent, seed = 120, 11
    config = _config(proxy, f"127.0.0.1:{collector.port}", ratio=0.5)
    with GatewayThread(config) as gateway:
        tracing = gateway.gateway.telemetry.tracing
        gateway.call(setattr, tracing, "_random", random.Random(seed).random)  # Tracing's RNG, seeded
        client = triton_grpc.InferenceServerClient(gateway.address)
        try:
            for _ in range(sent):
                client.infer("simple_scale", _inputs())
        finally:
            client.close()
        traced = gateway.call(lambda: tracing.traced)
    draws = random.Random(seed)
    assert traced == sum(draws.random() < 0.5 for _ in range(sent))
    spans = _wait_spans(collector, lambda s: len([x for x in s if x.name.startswith("infer ")]) == traced,
                        f"{traced} request spans")
    roots = [s for s in spans if s.name.startswith("infer ")]
    assert all(not s.parent_span_id for s in roots)  # no client context: the gateway's span is the root
    assert len({s.trace_id for s in roots}) == traced
    _assert_each_backend_call_carried_its_span(proxy, [s for s in spans if s.name == "tensorgate.backend"])
    assert proxy.forwarded == sent


def test_batched_requests_get_queue_spans_and_share_one_backend_call(proxy, triton_spans, collector):
    config = _config(proxy, f"127.0.0.1:{collector.port}", ratio=1.0, mode="fixed", max_queue_delay_us=20_000)

    async def burst(address: str, count: int) -> None:
        client = triton_aio.InferenceServerClient(address)
        try:
            results = await asyncio.gather(*(client.infer("fixed_cost", _inputs(float(i))) for i in range(count)))
            for i, result in enumerate(results):
                assert np.all(result.as_numpy("OUTPUT0") == float(i))
        finally:
            await client.close()

    with GatewayThread(config) as gateway:
        window_start = time.time_ns()
        asyncio.run(burst(gateway.address, 8))
        window = (window_start, time.time_ns())
        spans = _wait_spans(collector, lambda s: len([x for x in s if x.name == "infer fixed_cost"]) == 8
                            and len([x for x in s if x.name == "tensorgate.backend"]) == 8, "8 request and backend spans")
        batches = gateway.snapshot()["batching"]["fixed_cost:1"]["batches"]
        assert not gateway.loop_errors
    by_id = {s.span_id: s for s in spans}
    requests = [s for s in spans if s.name == "infer fixed_cost"]
    for request in requests:
        children = [s for s in spans if s.parent_span_id == request.span_id]
        assert sorted(s.name for s in children) == ["tensorgate.backend", "tensorgate.queue"], children
        [queue] = [s for s in children if s.name == "tensorgate.queue"]
        assert request.start_ns <= queue.start_ns <= queue.end_ns <= request.end_ns
    backends = [s for s in spans if s.name == "tensorgate.backend"]
    assert max(s.attributes["tensorgate.batch.requests"] for s in backends) > 1  # a 20 ms delay batches them
    assert all(by_id[s.parent_span_id].name == "infer fixed_cost" for s in backends)
    # One upstream call per batch, each carrying the backend span of one of its members.
    sent = [_parsed(header) for header in _traceparents_sent_upstream(proxy)]
    assert len(sent) == len(set(sent)) == batches == proxy.forwarded < 8
    assert set(sent) <= {(b.trace_id, b.span_id, True) for b in backends}, (sent, backends)
    carried = [b for b in backends if (b.trace_id, b.span_id, True) in sent]
    _assert_triton_spans_under_backend_calls(triton_spans, carried, proxy.forwarded, window, require_child=False)


@pytest.mark.parametrize("collector_state", ["refuses", "hangs"])
def test_collector_down_requests_still_succeed(traced_triton, collector_state):
    """A collector that is gone (connection refused) or hangs (accepts, never answers): every
    request still answers as fast as usual — span export is the exporter thread's problem."""
    hanging = HangingServer() if collector_state == "hangs" else None
    if hanging is not None:
        port = hanging.port
    else:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    config = _config(traced_triton, f"127.0.0.1:{port}", ratio=1.0)
    config["telemetry"]["otlp_interval_s"] = 0.2  # metric exports too, five times a second
    thread = GatewayThread(config).start()
    try:
        client = triton_grpc.InferenceServerClient(thread.address)
        latencies = []
        try:
            began = time.monotonic()
            while time.monotonic() - began < 2.5:  # past four of the span processor's 0.5 s schedules, many metric exports
                started = time.perf_counter()
                client.infer("simple_scale", _inputs())
                latencies.append(time.perf_counter() - started)
        finally:
            client.close()
        traced = thread.call(lambda: thread.gateway.telemetry.tracing.traced)
        assert traced > 50
        if hanging is not None:
            assert hanging.accepted >= 1  # the exporters did connect, and got no answer
        assert not thread.loop_errors
    finally:
        started = time.monotonic()
        thread.stop()  # flushing spans to nowhere is bounded
        stopped_in = time.monotonic() - started
        if hanging is not None:
            hanging.close()
    # Were requests to wait on the exporters (the span processor's schedule, the exporters'
    # 1-2-4 s retry backoff, their 10 s timeout), most would take a second or more and few would be
    # answered in the time. They take their usual few milliseconds; a busy shared machine
    # stretches a handful, which only the maximum sees.
    p50, p90 = np.percentile(latencies, [50, 90])
    summary = (f"{len(latencies)} requests in 2.5 s, p50 {p50 * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms, "
               f"max {max(latencies) * 1e3:.0f} ms, while the collector {collector_state}")
    assert len(latencies) >= 100 and p90 < 0.02 and max(latencies) < 2.0, summary
    # The final flush is bounded (Tracing.close: 2 s, then the exporter is shut down; the metric
    # reader's last export: 2 s).
    assert stopped_in < 6
