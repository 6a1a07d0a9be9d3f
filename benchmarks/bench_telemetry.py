"""What telemetry adds to one request on the gateway's hot path, against the OpenTelemetry SDK's own record().

    python benchmarks/bench_telemetry.py [--quick]

Rows (CPU time of this process, best of interleaved rounds; exporter threads included where they run):

  metrics observer         RequestAggregates.record of a batched request: duration, backend-call and
                           queue-time histograms (three dict lookups, three bisects)
  trace decision, no ctx   Tracing.start for a request without trace context, not sampled (ratio 1 %),
                           its call's headers as the h2 and envoy engines hand them over
  trace decision, ctx 00   the same with a client traceparent whose sampled flag is off
  traced request           a sampled request's spans: request span, backend span, queue span, ended and
                           exported over OTLP to a receiver in this process (at this benchmark's rate the
                           SDK's span queue overflows and drops some spans unexported: a lower bound)
  SDK histogram.record     baseline: one OpenTelemetry SDK Histogram.record with 3 attributes (what the
                           hot path would pay per instrument if it called the SDK)

The last line adds up the per-request cost with tracing at 1 %: observer + decision + 1 % × traced.
bench_gateway.py `--only telemetry` measures the same end to end (target: ≤ 5 % of the gateway's CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402

from gateway.bench.measure import best_time, format_time, machine, table  # noqa: E402
from gateway.bench.otlp_receiver import GrpcReceiver  # noqa: E402
from gateway.protocol import pb  # noqa: E402
from gateway.pipeline.exchange import Exchange, ModelEntry  # noqa: E402
from gateway.protocol.tensors import ModelSignature  # noqa: E402
from gateway.server.engines.grpc_asgi import metadata_of  # noqa: E402
from gateway.server.rpc import Call  # noqa: E402
from gateway.telemetry.aggregates import OK, RequestAggregates  # noqa: E402
from gateway.telemetry.config import TelemetryConfig  # noqa: E402
from gateway.telemetry.tracing import Tracing  # noqa: E402

SAMPLING = 0.01


class _Backend:
    address, pool = "10.0.0.5:8001", "gpu"
    carries_trace_context = True  # the HTTP upstream: the context rides a header of the request

    async def infer(self, request, trace_context=None):
        return None  # answered at once: the coroutine never suspends


def _exchange(entry: ModelEntry, trace=None) -> Exchange:
    exchange = Exchange(entry, pb.ModelInferRequest(model_name=entry.name, id="r1"), time.perf_counter_ns(), trace)
    exchange.backend, exchange.route = _Backend(), "preferred"
    exchange.elapsed_ns, exchange.upstream_started_ns, exchange.upstream_ns = 900_000, exchange.started_ns + 200_000, 500_000
    exchange.queued_ns, exchange.batch_rows = 150_000, 8
    return exchange


def _call(extra: tuple) -> Call:
    """A call as the ASGI engines (h2, envoy) hand it over: the request headers a stock gRPC client
    sends, plus `extra`."""
    headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"30S"),
               (b"user-agent", b"grpc-python/1.85.3 grpc-c/50.0.0 (linux; chttp2)"),
               (b"grpc-accept-encoding", b"identity, deflate, gzip"), *extra]
    return Call(None, partial(metadata_of, headers), "", dict(headers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    arguments = parser.parse_args(argv)
    rounds, round_s = (3, 0.05) if arguments.quick else (7, 0.2)

    signature = ModelSignature("simple_scale", "1", {}, {}, max_batch_size=64, decoupled=False, sequence=False,
                               sequence_idle_s=None)
    entry = ModelEntry("simple_scale", "1", signature)
    aggregates = RequestAggregates()
    exchange = _exchange(entry)

    receiver = GrpcReceiver()
    config = TelemetryConfig(otlp_endpoint=f"127.0.0.1:{receiver.port}", trace_sampling_ratio=SAMPLING)
    tracing = Tracing(config, Resource.create({"service.name": "bench"}))
    request = pb.ModelInferRequest(model_name="simple_scale", id="r1")
    plain = _call(())
    unsampled = _call(((b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),))
    sampled = _call(((b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),))

    def traced_request() -> None:
        trace = tracing.start(entry, request, sampled, time.perf_counter_ns())
        traced = _exchange(entry, trace)
        try:  # the backend call's span, around a call that is answered at once (no event loop needed)
            tracing.send(traced.backend, traced, None).send(None)
        except StopIteration:
            pass
        tracing.observer(traced, None, None)

    reader = InMemoryMetricReader()
    histogram = MeterProvider(metric_readers=[reader]).get_meter("bench").create_histogram("bench.duration", unit="s")
    attributes = {"model": "simple_scale", "version": "1", "rpc.response.status_code": "OK"}

    calls = {
        "metrics observer": lambda: aggregates.record(exchange, OK),
        "trace decision, no ctx": lambda: tracing.start(entry, request, plain, 0),
        "trace decision, ctx 00": lambda: tracing.start(entry, request, unsampled, 0),
        "traced request": traced_request,
        "SDK histogram.record": lambda: histogram.record(0.0009, attributes),
    }
    print(f"machine: {machine()}")
    print(f"clock: CPU time of this process (process_time); rounds: {rounds} x ~{round_s * 1e3:g} ms, best kept\n", flush=True)
    try:
        best = best_time(calls, rounds, round_s, clock=time.process_time)
    finally:
        tracing.close()
        receiver.stop()
    sdk = best["SDK histogram.record"]
    rows = [[name, format_time(seconds), f"{seconds / sdk:.2f}"] for name, seconds in best.items()]
    print(table(["per request", "CPU time", "÷ SDK record()"], rows))
    added = best["metrics observer"] + best["trace decision, no ctx"] + SAMPLING * best["traced request"]
    print(f"\nadded per request, metrics + tracing at {SAMPLING:.0%}: {format_time(added)} "
          f"(the SDK would pay {format_time(3 * sdk)} for three histogram records alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
