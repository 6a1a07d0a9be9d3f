"""Telemetry over OTLP: the gateway's metrics as a real OTLP/gRPC collector endpoint receives them.

The receiver (tests/otlp_receivers.py) is the collector's own service definition
(opentelemetry-proto's MetricsService), served by grpcio in a thread of its own; it keeps every
ExportMetricsServiceRequest with the metadata it came with.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from gateway.testing import GatewayThread
from gateway.bench.otlp_receiver import GrpcReceiver
from tests.waiting import wait_until

MODEL = "simple_scale"
INTERVAL_S = 0.5


@pytest.fixture
def receiver():
    server = GrpcReceiver()
    yield server
    server.stop()


def _attributes(point) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in point.attributes}


def _metrics(request, name: str) -> list:
    return [m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name]


def _counted(request, metric: str = "tensorgate.requests") -> int | None:
    """MODEL's cumulative count in one export: the request counter's value or the histogram's count."""
    counts = [p.as_int for m in _metrics(request, metric) if m.HasField("sum") for p in m.sum.data_points
              if _attributes(p).get("model") == MODEL]
    counts += [p.count for m in _metrics(request, metric) if m.HasField("histogram")
               for p in m.histogram.data_points if _attributes(p).get("model") == MODEL]
    return sum(counts) if counts else None


def _errors(request) -> int:
    """Every error one export counts, of any model (refusals of unknown models included)."""
    return sum(p.as_int for m in _metrics(request, "tensorgate.errors") for p in m.sum.data_points)


def _wait_for_export(receiver: GrpcReceiver, count: int, metric: str = "tensorgate.requests", timeout: float = 15.0,
                     errors: int | None = None):
    """The first export in which `metric` counts `count` requests of MODEL (and, given `errors`, the
    errors counter that many of every model), with its metadata. Exports arrive every interval, each
    collected when it was sent: an earlier one may count some of a test's requests and not the rest."""
    found = wait_until(lambda: next(((request, metadata) for request, metadata in receiver.received()
                                     if _counted(request, metric) == count
                                     and (errors is None or _errors(request) == errors)), None),
                       f"an OTLP export counting {count} requests of {MODEL} in {metric}", timeout, step=0.1,
                       raise_on_timeout=False)
    if found is not None:
        return found
    exports = receiver.received()
    last = exports[-1][0] if exports else None
    names = sorted({m.name for rm in last.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}) if last else []
    raise AssertionError(f"no OTLP export counted {count} requests of {MODEL} in {metric} within {timeout:.0f} s: "
                         f"{len(exports)} exports, the last with {metric} = {last and _counted(last, metric)}, "
                         f"errors = {last and _errors(last)} (wanted {errors}) and metrics {names}")


def _send(client: triton_grpc.InferenceServerClient, count: int, shape=(1, 16), model: str = MODEL) -> None:
    tensor = triton_grpc.InferInput("INPUT0", list(shape), "FP32")
    tensor.set_data_from_numpy(np.ones(shape, np.float32))
    for _ in range(count):
        result = client.infer(model, [tensor], client_timeout=10)
        assert result.as_numpy("OUTPUT0")[0, 0] == 2.0


def _refused(client, shape, model: str = MODEL) -> str:
    with pytest.raises(InferenceServerException) as raised:
        _send(client, 1, shape, model)
    return raised.value.status()


def test_otlp_receiver_gets_counter_histogram_resource_and_headers(tritons, receiver):
    n = 23
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "otlp_interval_s": INTERVAL_S,
                      "otlp_headers": {"x-tenant": "t1"}},
    }
    with GatewayThread(config) as thread:
        client = triton_grpc.InferenceServerClient(thread.address)
        try:
            _send(client, n)
            # Refused in admission (request validation, model resolution), before any backend call:
            # counted as errors with no pool or backend; a model the fleet does not serve is
            # reported as "_unknown", so client-chosen names cannot mint series.
            assert _refused(client, (1, 8)) == "StatusCode.INVALID_ARGUMENT"
            assert _refused(client, (1, 16), model="no_such_model") == "StatusCode.NOT_FOUND"
            with grpc.insecure_channel(thread.address) as channel:  # bytes that are no ModelInferRequest
                with pytest.raises(grpc.RpcError) as garbage:
                    channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=10)
                assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            client.close()
        # MODEL counts n + 1 (the invalid one), the errors three: the invalid, the unknown model, the garbage.
        request, metadata = _wait_for_export(receiver, n + 1, errors=3)
        assert not thread.loop_errors

    assert metadata.get("x-tenant") == "t1", metadata

    assert request.resource_metrics
    resource = {kv.key: kv.value.string_value for kv in request.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "tensorgate"
    assert resource["telemetry.sdk.name"] == "opentelemetry"
    scopes = {sm.scope.name for rm in request.resource_metrics for sm in rm.scope_metrics}
    assert scopes == {"tensorgate"}

    # The request counter: cumulative, monotonic; the served requests under the model's concrete
    # version and the backend that served them, the refused ones under no backend.
    [counter] = _metrics(request, "tensorgate.requests")
    assert counter.unit == "{request}"
    assert counter.sum.is_monotonic
    assert counter.sum.aggregation_temporality == 2  # AGGREGATION_TEMPORALITY_CUMULATIVE
    by_status = {_attributes(p)["rpc.response.status_code"]: p for p in counter.sum.data_points
                 if _attributes(p)["model"] == MODEL}
    assert set(by_status) == {"OK", "INVALID_ARGUMENT"}, [_attributes(p) for p in counter.sum.data_points]
    attributes = _attributes(by_status["OK"])
    assert attributes == {"model": MODEL, "version": "1", "pool": "primary", "backend": tritons[0].grpc_address,
                          "rpc.response.status_code": "OK"}
    assert by_status["OK"].as_int == n
    assert by_status["INVALID_ARGUMENT"].as_int == 1
    assert _attributes(by_status["INVALID_ARGUMENT"])["backend"] == ""
    [errors] = _metrics(request, "tensorgate.errors")
    assert sorted((_attributes(p)["model"], _attributes(p)["rpc.response.status_code"], p.as_int)
                  for p in errors.sum.data_points) == [("_unknown", "INVALID_ARGUMENT", 1), ("_unknown", "NOT_FOUND", 1),
                                                           (MODEL, "INVALID_ARGUMENT", 1)]

    # The duration histogram: the same series, count n, buckets that add up to it.
    [duration] = _metrics(request, "tensorgate.request.duration")
    assert duration.unit == "s"
    assert duration.histogram.aggregation_temporality == 2
    [point] = [p for p in duration.histogram.data_points if _attributes(p) == attributes]
    assert point.count == n
    assert sum(point.bucket_counts) == point.count
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1
    assert 0 < point.min <= point.max and point.min * n <= point.sum <= point.max * n
    assert point.start_time_unix_nano < point.time_unix_nano

    # Gauges ride along in the same export.
    [healthy] = _metrics(request, "tensorgate.backend.healthy")
    assert {(_attributes(p)["backend"], p.as_int) for p in healthy.gauge.data_points} == {(tritons[0].grpc_address, 1)}


def test_collector_going_away_mid_run_never_slows_requests(tritons, receiver):
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "otlp_interval_s": INTERVAL_S},
    }
    thread = GatewayThread(config).start()
    try:
        client = triton_grpc.InferenceServerClient(thread.address)
        try:
            _send(client, 5)
            _wait_for_export(receiver, 5, "tensorgate.request.duration")
            receiver.stop()  # exports now fail (and retry) in the reader's thread
            started = time.monotonic()
            _send(client, 40)
            assert time.monotonic() - started < 5
        finally:
            client.close()
        counts = thread.call(lambda: [s.count for s in thread.gateway.telemetry.aggregates.snapshot()])
        assert counts == [45]
        assert not thread.loop_errors
    finally:
        started = time.monotonic()
        thread.stop()  # includes the final, bounded OTLP export to the collector that is gone
    assert time.monotonic() - started < 10


def test_otlp_exponential_histograms_carry_the_same_buckets(tritons, receiver):
    """`otlp_histogram: exponential`: OpenTelemetry's base-2 exponential histogram at scale 1, whose
    buckets (base^i, base^(i+1)] are exactly the explicit √2 ladder's."""
    from gateway.telemetry.histogram import DURATION_FIRST_INDEX, SCALE

    n = 17
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "otlp_interval_s": INTERVAL_S,
                      "otlp_histogram": "exponential"},
    }
    with GatewayThread(config) as thread:
        client = triton_grpc.InferenceServerClient(thread.address)
        try:
            _send(client, n)
        finally:
            client.close()
        request, _ = _wait_for_export(receiver, n, "tensorgate.requests")
        assert not thread.loop_errors
    for name in ("tensorgate.request.duration", "tensorgate.backend.duration", "tensorgate.batching.queue.duration"):
        [metric] = _metrics(request, name)
        assert metric.HasField("exponential_histogram"), name
        assert metric.exponential_histogram.aggregation_temporality == 2
        [point] = [p for p in metric.exponential_histogram.data_points if _attributes(p)["model"] == MODEL]
        assert point.count == n == sum(point.positive.bucket_counts)
        assert point.scale == SCALE and point.positive.offset == DURATION_FIRST_INDEX - 1
        base = 2 ** (2**-SCALE)
        filled = [point.positive.offset + i for i, count in enumerate(point.positive.bucket_counts) if count]
        lowest, highest = filled[0], filled[-1]
        # min lies in the lowest filled bucket and max in the highest (unless past the ladder's ends).
        assert base**lowest < point.min <= base ** (lowest + 1) or lowest == point.positive.offset
        assert base**highest < point.max <= base ** (highest + 1)
        assert point.min * n <= point.sum <= point.max * n
