"""Telemetry: the gateway's metrics as a real Prometheus server scrapes and stores them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.testing import GatewayThread
from tests.waiting import wait_until

PROMETHEUS = "/usr/bin/prometheus"
MODEL = "simple_scale"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus scraping 127.0.0.1:<metrics port> every second; yields (metrics port, API URL)."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} not found: install it (Debian package `prometheus`; `make test` installs it)")
    metrics_port, web_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tensorgate\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{web_port}"
    try:
        def ready():
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            with urllib.request.urlopen(f"{api}/-/ready", timeout=2) as response:
                return response.status == 200

        wait_until(ready, "Prometheus to be ready", 30, step=0.25, ignore=(OSError,))
        yield metrics_port, api
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _query(api: str, promql: str) -> float | None:
    body = _get_json(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _send(address: str, count: int) -> None:
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    try:
        for _ in range(count):
            result = client.infer(MODEL, [tensor], client_timeout=10)
            assert result.as_numpy("OUTPUT0")[0, 0] == 2.0
    finally:
        client.close()


def test_prometheus_scrapes_request_counter_and_histogram(tritons, prometheus):
    metrics_port, api = prometheus
    n = 37
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
    }
    with GatewayThread(config) as thread:
        assert thread.gateway.telemetry.prometheus_port == metrics_port
        _send(thread.address, n)
        selector = f'{{model="{MODEL}",rpc_response_status_code="OK"}}'
        requests = f"sum(tensorgate_requests_total{selector})"
        durations = f"sum(tensorgate_request_duration_seconds_count{selector})"
        wait_until(lambda: _query(api, requests) == n and _query(api, durations) == n,
                   f"Prometheus to report {n} requests", 30, step=0.25, ignore=(OSError,))
        assert _query(api, requests) == n
        assert _query(api, durations) == n
        assert _query(api, f'sum(tensorgate_errors_total{{model="{MODEL}"}})') is None  # no errors, no series
        assert _query(api, f'tensorgate_backend_healthy{{backend="{tritons[0].grpc_address}"}}') == 1
        assert _query(api, f"sum(tensorgate_request_duration_seconds_sum{selector})") > 0
        assert not thread.loop_errors


@pytest.mark.parametrize("collector_state", ["refuses", "hangs"])
def test_unreachable_otlp_collector_never_fails_requests(tritons, collector_state):
    """A collector that refuses connections or accepts them and never answers: requests are
    answered as fast as usual while the exports fail (or wait) in the reader's thread."""
    from tests.servers import HangingServer

    hanging = HangingServer() if collector_state == "hangs" else None
    port = hanging.port if hanging is not None else _free_port()
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"otlp_endpoint": f"127.0.0.1:{port}", "otlp_interval_s": 0.1},
    }
    try:
        with GatewayThread(config) as thread:
            client = triton_grpc.InferenceServerClient(thread.address)
            tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            latencies = []
            try:
                began = time.monotonic()
                while time.monotonic() - began < 1.5:  # fifteen export attempts
                    started = time.perf_counter()
                    assert client.infer(MODEL, [tensor], client_timeout=10).as_numpy("OUTPUT0")[0, 0] == 2.0
                    latencies.append(time.perf_counter() - started)
            finally:
                client.close()
            counts = thread.call(lambda: [s.count for s in thread.gateway.telemetry.aggregates.snapshot()])
            assert counts == [len(latencies)]
            if hanging is not None:
                assert hanging.accepted >= 1  # the exporter connected, and got no answer
            assert not thread.loop_errors
    finally:
        if hanging is not None:
            hanging.close()
    # A request that waited on an export would take its 10 s timeout or 1-2-4 s retry backoff.
    p90 = float(np.percentile(latencies, 90))
    assert len(latencies) >= 50 and p90 < 0.02 and max(latencies) < 2.0, (
        f"{len(latencies)} requests, p90 {p90 * 1e3:.1f} ms, max {max(latencies) * 1e3:.0f} ms")


@pytest.mark.parametrize(
    ("telemetry", "path"),
    [
        ({"prometheus_port": 70000}, "telemetry.prometheus_port"),
        ({"otlp_endpoint": "x", "otlp_interval_s": 0}, "telemetry.otlp_interval_s"),
        ({"otlp_endpoint": "x", "trace_export_interval_s": 0}, "telemetry.trace_export_interval_s"),
        ({"otlp_endpoint": "x", "otlp_headers": {"Api-Key": "k"}}, "telemetry.otlp_headers.Api-Key"),
        ({"otlp_endpoint": "x", "otlp_histogram": "native"}, "telemetry.otlp_histogram"),
        ({"otlp_endpoint": "x", "trace_sampling_ratio": 1.5}, "telemetry.trace_sampling_ratio"),
        ({"trace_sampling_ratio": 0.1}, "telemetry.trace_sampling_ratio"),  # traces need an OTLP endpoint
        ({"otlp_endpoint": "x", "trace_sampling_ratio": "often"}, "telemetry.trace_sampling_ratio"),
    ],
)
def test_config_errors_name_the_key_path(telemetry, path):
    with pytest.raises(ConfigError) as raised:
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                             "telemetry": telemetry})
    assert path in str(raised.value)


def test_yaml_exponent_notation_is_a_number():
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a config author means a number."""
    import yaml

    config = config_from_mapping(yaml.safe_load(
        "listen: 127.0.0.1:0\npools: {p: {backends: ['127.0.0.1:1']}}\n"
        "telemetry: {otlp_endpoint: 'x:1', trace_sampling_ratio: 1e-3}\n"))
    assert config.telemetry.trace_sampling_ratio == 0.001
    assert config.telemetry.tracing


def test_telemetry_off_by_default():
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}}})
    assert not config.telemetry.enabled


def test_prometheus_histograms_of_queue_backend_batch_size_and_routing(tritons, prometheus):
    """Batched traffic: each request's queue and backend time, each batch's size, each routing decision."""
    import asyncio

    import tritonclient.grpc.aio as triton_aio

    metrics_port, api = prometheus
    model, n = "fixed_cost", 24
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "batching": {"default": {"mode": "fixed", "max_queue_delay_us": 20_000}},
        "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
    }

    async def burst(address: str) -> None:
        client = triton_aio.InferenceServerClient(address)
        tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        try:
            await asyncio.gather(*(client.infer(model, [tensor]) for _ in range(n)))
        finally:
            await client.close()

    with GatewayThread(config) as thread:
        asyncio.run(burst(thread.address))
        batches = thread.call(lambda: thread.gateway.batching.snapshot()[f"{model}:1"]["batches"])
        selector = f'{{model="{model}"}}'
        queries = {
            f"sum(tensorgate_request_duration_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}})": n,
            f"sum(tensorgate_backend_duration_seconds_count{selector})": n,
            f"sum(tensorgate_batching_queue_duration_seconds_count{selector})": n,
            f"sum(tensorgate_batch_size_count{selector})": batches,
            f"sum(tensorgate_batch_size_sum{selector})": n,  # one row each
            'sum(tensorgate_routing_decisions_total{pool="primary",reason="preferred"})': batches,
            f"sum(tensorgate_batching_queue_depth{selector})": 0,
        }
        wait_until(lambda: all(_query(api, q) == want for q, want in queries.items()),
                   f"Prometheus to report {n} requests in {batches} batches: "
                   + ", ".join(f"{q} = {_query(api, q)}" for q in queries), 30, step=0.25, ignore=(OSError,))
        assert batches < n  # a 20 ms delay gathers them
        # The backend label is the backend that served them; the buckets are the same √2 ladder for every series.
        backend = f'tensorgate_backend_duration_seconds_count{{model="{model}",backend="{tritons[0].grpc_address}",pool="primary"}}'
        assert _query(api, backend) == n
        bounds = _get_json(f"{api}/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": f'tensorgate_batching_queue_duration_seconds_bucket{selector}'}))["data"]
        les = sorted(float(series["le"]) for series in bounds if series["le"] != "+Inf")
        assert len(les) == 43 and all(abs(b / a - 2**0.5) < 1e-9 for a, b in zip(les, les[1:]))
        assert not thread.loop_errors


def test_prometheus_stores_drift_gauges_alerts_and_bin_counts_after_a_drifted_stream(tritons, prometheus):
    metrics_port, api = prometheus
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]}},
        "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
        "drift": {"models": {MODEL: {"inputs": ["INPUT0"], "window_rows": 64, "sub_windows": 1, "consecutive": 1,
                                     "reference": {"learn_rows": 64}}}},
    }
    rng = np.random.default_rng(1)
    with GatewayThread(config) as thread:
        client = triton_grpc.InferenceServerClient(thread.address)
        try:
            for shift in [0.0] * 4 + [3.0] * 4:  # 64 rows learn the reference, then 64 rows shifted by 3σ
                tensor = triton_grpc.InferInput("INPUT0", [16, 16], "FP32")
                tensor.set_data_from_numpy((rng.standard_normal((16, 16)) + shift).astype(np.float32))
                client.infer(MODEL, [tensor], client_timeout=10)
        finally:
            client.close()
        psi = f'tensorgate_drift_statistic{{model="{MODEL}",tensor="input/INPUT0",statistic="psi"}}'
        alerts = f'sum(tensorgate_drift_alerts_total{{model="{MODEL}",level="alert"}})'
        rows = f'sum(tensorgate_drift_observations_bucket{{model="{MODEL}",le="+Inf"}})'
        body = wait_until(lambda: _get_json(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": psi}))["data"]["result"]
                          if _query(api, alerts) and _query(api, rows) else None,
                          "drift series in Prometheus", 30, step=0.25, ignore=(OSError,))
        assert {series["metric"]["feature"] for series in body} == {str(f) for f in range(16)}
        assert min(float(series["value"][1]) for series in body) > 0.25  # PSI's usual "significant shift"
        assert _query(api, alerts) >= 1
        assert _query(api, rows) == 64 * 16  # the drifted window's values, every feature, all in buckets
        effect = f'tensorgate_drift_statistic{{model="{MODEL}",tensor="input/INPUT0",statistic="effect_size"}}'
        shifts = [float(series["value"][1]) for series in
                  _get_json(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": effect}))["data"]["result"]]
        assert len(shifts) == 16 and min(shifts) > 2.0  # 3σ, in reference SDs (64 rows: noisy, binned)
        assert not thread.loop_errors


def test_queue_depth_and_backend_inflight_gauges_while_work_waits(tritons):
    """The gauges read the live state: checked while requests wait in a batch queue and while
    others are held in flight at the backend (a proxy in front of Triton holds them), then after."""
    import concurrent.futures

    from tests.servers import UpstreamProxy, sample, scrape

    proxy = UpstreamProxy(tritons[0].grpc_address)
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [proxy.address]}},
        "upstream": {"transport": "grpc-stream"},  # the proxy speaks gRPC
        # simple_scale waits for a batch of 4 (the window is a minute); fixed_cost goes straight upstream.
        "batching": {"default": {"mode": "fixed", "max_queue_delay_us": 60_000_000, "max_batch_size": 4},
                     "models": {"fixed_cost": {"enabled": False}}},
        "telemetry": {"prometheus_port": 0, "prometheus_host": "127.0.0.1"},
    }

    def infer(model: str) -> float:
        client = triton_grpc.InferenceServerClient(thread.address)
        tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        try:
            return float(client.infer(model, [tensor], client_timeout=60).as_numpy("OUTPUT0")[0, 0])
        finally:
            client.close()

    pool = concurrent.futures.ThreadPoolExecutor(9)
    try:
        with GatewayThread(config) as thread:
            port = thread.gateway.telemetry.prometheus_port
            infer("fixed_cost")  # the models are known, the stream is open
            proxy.hold()
            in_flight = [pool.submit(infer, "fixed_cost") for _ in range(5)]
            queued = [pool.submit(infer, "simple_scale") for _ in range(3)]
            queue_depth = 'tensorgate_batching_queue_depth'
            wait_until(lambda: proxy.held == 5 and sample(scrape(port), queue_depth, model="simple_scale") == 3,
                       f"5 requests held at the backend and 3 in the batch queue ({proxy!r}, "
                       f"{thread.snapshot()})", 30, step=0.25, ignore=(OSError,))
            during = scrape(port)
            assert sample(during, queue_depth, model="simple_scale", version="1") == 3
            assert sample(during, "tensorgate_backend_inflight", backend=proxy.address, pool="primary") == 5
            assert not any(future.done() for future in in_flight + queued)

            proxy.release()
            assert [future.result(30) for future in in_flight] == [1.0] * 5
            queued.append(pool.submit(infer, "simple_scale"))  # the fourth fills the batch: it leaves
            assert [future.result(30) for future in queued] == [2.0] * 4
            after = scrape(port)
            assert sample(after, queue_depth, model="simple_scale", version="1") == 0
            assert sample(after, "tensorgate_backend_inflight", backend=proxy.address, pool="primary") == 0
            assert not thread.loop_errors
    finally:
        proxy.release()
        pool.shutdown(wait=True)
        proxy.close()
