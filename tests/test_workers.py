"""Two workers on one port behave as one gateway: real `tensorgate serve --workers 2` processes
(gateway/testing.py WorkersProcess), real Tritons from the wheel, stock tritonclient.

Which worker serves a connection is the kernel's choice (SO_REUSEPORT); the tests open new
connections (a local subchannel pool per client, so no connection is shared) until they reach the
worker they need, and ask that connection's worker for its id through the admin snapshot.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import messages as drift_messages
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import Snapshot, SnapshotRequest
from gateway.testing import WorkersProcess
from tests.conftest import start_tritons
from tests.servers import UpstreamProxy, sample, scrape
from tests.waiting import process_running, wait_until

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Connection:
    """A tritonclient on a connection of its own, and the id of the worker that serves it."""

    def __init__(self, address: str) -> None:
        self.client = triton_grpc.InferenceServerClient(address, channel_args=OWN_CONNECTION)
        self.worker = self.snapshot()["worker"]["id"]

    def snapshot(self) -> dict:
        call = self.client._channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot",
                                                request_serializer=SnapshotRequest.SerializeToString,
                                                response_deserializer=Snapshot.FromString)
        return json.loads(call(SnapshotRequest(), timeout=10).json)

    def close(self) -> None:
        self.client.close()


def connect_to(address: str, worker: int, attempts: int = 200) -> Connection:
    """A new connection that the kernel gave to `worker`."""
    for _ in range(attempts):
        connection = Connection(address)
        if connection.worker == worker:
            return connection
        connection.close()
    raise AssertionError(f"{attempts} new connections never reached worker {worker}")


def poll(read, expected, timeout: float = 30.0):
    """`read()` until it equals `expected` (reports arrive every server.workers_report_s): the last
    value read, equal or not after `timeout` (the callers compare it with what they expected)."""
    return wait_until(read, f"a value equal to {expected!r}", timeout, step=0.1,
                      accept=lambda value: value == expected, raise_on_timeout=False)


def _scale_inputs(rows: np.ndarray):
    tensor = triton_grpc.InferInput("INPUT0", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    return [tensor]


def _sequence_inputs(value: int):
    tensor = triton_grpc.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


@pytest.fixture(scope="module", params=["grpcio", "envoy", "h2"])
def engine(request) -> str:
    """Both engines: SO_REUSEPORT on grpc.aio's socket, Envoy's reuse_port on Envoy's listener."""
    return request.param


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    servers = start_tritons(2, tmp_path_factory.mktemp("workers-triton-logs"), "workers")
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers-drift") / "training.npy"
    np.save(path, np.random.default_rng(1).standard_normal((20_000, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def workers(backends, reference_file, engine):
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"main": {"backends": [b.grpc_address for b in backends]}},
        "telemetry": {"prometheus_port": 0, "prometheus_host": "127.0.0.1"},
        "drift": {"models": {"simple_scale": {"inputs": ["INPUT0"], "window_rows": 2560,
                                              "reference": {"file": str(reference_file)}}}},
    }
    with WorkersProcess(config, workers=2, engine=engine) as process:
        yield process


def test_a_reconnecting_sequence_lands_on_the_same_backend(workers):
    rng = np.random.default_rng(3)
    # 24 sequences: all on one of two backends by chance once in 8 million runs (12 was once in 2,048).
    sequences = {5000 + i: [int(v) for v in rng.integers(1, 100, size=4)] for i in range(24)}
    for sequence_id, values in sequences.items():
        sums = []
        for step, value in enumerate(values):
            # every step through a new connection, alternating workers: 0, 1, 0, 1
            connection = connect_to(workers.address, step % 2)
            try:
                result = connection.client.infer("accumulate_sequence", _sequence_inputs(value),
                                                 sequence_id=sequence_id, sequence_start=step == 0,
                                                 sequence_end=step == len(values) - 1)
            finally:
                connection.close()
            sums.append(int(result.as_numpy("OUTPUT")[0, 0]))
        # Triton keeps the running sum on one backend: a step on the other would not see it.
        assert sums == list(np.cumsum(values)), (sequence_id, sums)
    # The parent's view: the workers report every server.workers_report_s.
    served = wait_until(lambda: {address: b["served"] for address, b in workers.admin_snapshot()["backends"].items()},
                        "both backends served", 10, step=0.1, raise_on_timeout=False,
                        accept=lambda served: len(served) == 2 and all(count > 0 for count in served.values()))
    assert len(served) == 2 and all(count > 0 for count in served.values()), \
        f"sequences should spread over both backends: {served}"


def _model_statistics(connection: Connection, model: str) -> tuple[int, int]:
    stats = connection.client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats["inference_stats"]["success"].get("count", 0))


def test_metrics_and_model_statistics_count_the_traffic_of_both_workers(workers):
    first, second = connect_to(workers.address, 0), connect_to(workers.address, 1)
    try:
        sent = {0: 37, 1: 23}
        for connection in (first, second):
            for _ in range(sent[connection.worker]):
                connection.client.infer("mlp", _scale_inputs(np.ones((1, 16))))
        total = sum(sent.values())
        # Each worker answers with every worker's counts.
        for connection in (first, second):
            assert poll(lambda: _model_statistics(connection, "mlp"), (total, total)) == (total, total)
            every_model = connection.client.get_inference_statistics(as_json=True)["model_stats"]
            assert [int(m["inference_count"]) for m in every_model if m["name"] == "mlp"] == [total]

        def prometheus():
            samples = scrape(workers.prometheus_port)
            requests = sum(value for (name, labels), value in samples.items()
                           if name == "tensorgate_requests_total" and ("model", "mlp") in labels)
            histogram = sum(value for (name, labels), value in samples.items()
                            if name == "tensorgate_request_duration_seconds_count" and ("model", "mlp") in labels)
            return requests, histogram

        assert poll(prometheus, (total, total)) == (total, total)
        per_worker = poll(lambda: {k: v.get("requests") for k, v in workers.admin_snapshot()["workers"].items()},
                          None, timeout=0.5)
        assert all(per_worker[str(w)] >= sent[w] for w in sent), per_worker
    finally:
        first.close()
        second.close()


def _send_blocks(connection: Connection, blocks) -> None:
    for block in blocks:
        connection.client.infer("simple_scale", _scale_inputs(block))


def _alerts(connection: Connection) -> list:
    m = drift_messages()
    call = connection.client._channel.unary_unary(f"/{DRIFT_SERVICE}/ListAlerts",
                                                  request_serializer=m["ListAlertsRequest"].SerializeToString,
                                                  response_deserializer=m["ListAlertsResponse"].FromString)
    return list(call(m["ListAlertsRequest"](model="simple_scale"), timeout=10).alerts)


def test_a_drift_shift_through_both_workers_alerts_once(workers):
    rng = np.random.default_rng(2)
    first, second = connect_to(workers.address, 0), connect_to(workers.address, 1)
    try:
        rows = 64
        quiet = [rng.standard_normal((rows, 16)) for _ in range(80)]  # 5,120 rows: two windows
        shifted = [rng.standard_normal((rows, 16)) for _ in range(160)]
        for block in shifted:
            block[:, 3] += 1.0  # PSI ~1, well past the 0.25 alert threshold whatever the rows' order
        _send_blocks(first, quiet[0::2])
        _send_blocks(second, quiet[1::2])
        # Every row sent counts in the one window (neither worker alone has a full window of its own).
        sent = len(quiet) + len(shifted)
        for start in range(0, len(shifted), 16):
            _send_blocks(first if start % 32 == 0 else second, shifted[start:start + 16])

        def sampled():
            drift = workers.admin_snapshot()["drift"]["simple_scale"]
            return int(drift.split("sampled=")[1].split()[0])

        assert poll(sampled, sent) == sent
        raised = [a for a in _alerts(first) if a.level == "alert"]
        assert raised, "a 1σ shift over four windows must raise an alert"
        assert {a.feature for a in raised} == {3}
        fired = {}
        for alert in raised:
            fired[(alert.tensor, alert.feature, alert.statistic)] = fired.get((alert.tensor, alert.feature, alert.statistic), 0) + 1
        assert all(count == 1 for count in fired.values()), f"each alert fires once for all workers: {fired}"
        # Both workers answer with the same alerts, and the one metrics endpoint counts each once.
        assert [(a.statistic, a.time) for a in _alerts(second)] == [(a.statistic, a.time) for a in _alerts(first)]
        samples = scrape(workers.prometheus_port)
        for (tensor, feature, statistic), count in fired.items():
            assert sample(samples, "tensorgate_drift_alerts_total", model="simple_scale", statistic=statistic,
                          level="alert") == count
    finally:
        first.close()
        second.close()


class Load:
    """Requests in a loop on one connection, in a thread; every outcome kept."""

    def __init__(self, connection: Connection, model: str = "simple_scale") -> None:
        self.connection, self.model = connection, model
        self.ok = 0
        self.failures: list[str] = []
        self.sending = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rows = np.ones((1, 16))
        while self.sending:
            try:
                self.connection.client.infer(self.model, _scale_inputs(rows), client_timeout=30)
                self.ok += 1
            except Exception as error:  # noqa: BLE001 — every failure is the test's business
                self.failures.append(repr(error))

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sending = False
        self._thread.join(60)


def test_a_killed_worker_comes_back_and_the_other_fails_nothing(backends, engine):
    config = {"listen": "127.0.0.1:0", "pools": {"main": {"backends": [b.grpc_address for b in backends]}}}
    with WorkersProcess(config, workers=2, engine=engine) as process:
        survivor = connect_to(process.address, 0)
        pids = process.worker_pids()
        load = Load(survivor).start()
        try:
            time.sleep(0.5)
            os.kill(pids[1], signal.SIGKILL)

            def worker_1():
                return survivor.snapshot()["workers"]["1"]

            def restarted(worker):
                return worker["pid"] not in (None, pids[1]) and worker["ready"] and worker["restarts"] == 1

            last = wait_until(worker_1, "worker 1 restarted once and ready", 60, step=0.1, accept=restarted,
                              raise_on_timeout=False)
            assert restarted(last), (f"worker 1 (was pid {pids[1]}) not back after 60 s; the parent says {last}; "
                                     f"its output ends:\n{process.output()[-6000:]}")
            comeback = connect_to(process.address, 1)  # the new worker 1 serves new connections
            comeback.client.infer("simple_scale", _scale_inputs(np.ones((1, 16))))
            comeback.close()
            time.sleep(0.5)
        finally:
            load.stop()
        assert load.failures == []
        assert load.ok > 0
        assert process.worker_pids()[0] == pids[0]  # the survivor was never restarted
        survivor.close()
        # A parent killed outright takes its workers with it (they would serve on, unsupervised).
        workers_now = list(process.worker_pids().values())
        process.process.kill()
        assert poll(lambda: [pid for pid in workers_now if process_running(pid)], [], timeout=60) == []
    assert f"worker 1 (pid {pids[1]}) exited with status -9" in process.output()


def test_sigterm_under_load_drains_both_workers_with_no_failed_request(backends, engine):
    proxy = UpstreamProxy(backends[0].grpc_address)  # holds requests at the backend on demand
    config = {"listen": "127.0.0.1:0", "pools": {"main": {"backends": [proxy.address]}},
              "upstream": {"transport": "grpc-stream"}, "server": {"grace_s": 20},
              "batching": {"default": {"enabled": False}}}  # one upstream message per request: each is held
    process = WorkersProcess(config, workers=2, engine=engine).start()
    connections = [connect_to(process.address, worker) for worker in (0, 1, 0, 1)]
    try:
        loads = [Load(connection, model="fixed_cost").start() for connection in connections]
        time.sleep(1.0)
        for load in loads:
            load.stop()
        assert all(load.ok > 0 and load.failures == [] for load in loads)
        # SIGHUP goes to every worker, and none of them dies of it.
        pids = process.worker_pids()
        process.process.send_signal(signal.SIGHUP)
        assert poll(lambda: "forwarded SIGHUP to the workers" in process.output(), True)
        time.sleep(1.0)
        assert process.worker_pids() == pids
        # Then requests in flight on both workers, held at the backend, when the parent gets SIGTERM.
        proxy.hold()
        outcomes: list = []
        held = [threading.Thread(target=lambda c=c: outcomes.append(_outcome(c)), daemon=True) for c in connections]
        for thread in held:
            thread.start()
        assert poll(lambda: proxy.held, len(connections)) == len(connections)
        process.process.send_signal(signal.SIGTERM)
        assert poll(lambda: "forwarded SIGTERM to the workers" in process.output(), True)
        time.sleep(2.0)  # what the workers would do without the requests in flight: stop at once
        assert process.process.poll() is None, "the workers must wait for the requests in flight"
        proxy.release()
        for thread in held:
            thread.join(60)
        status = process.process.wait(60)
    finally:
        proxy.release()
        for connection in connections:
            connection.close()
        process.stop()
        proxy.close()
    assert outcomes == ["ok"] * len(connections)
    assert status == 0
    assert process.output().count("stopped with status 0") == 2, process.output()[-3000:]


def _outcome(connection: Connection) -> str:
    try:
        connection.client.infer("fixed_cost", _scale_inputs(np.ones((1, 16))), client_timeout=60)
        return "ok"
    except Exception as error:  # noqa: BLE001
        return repr(error)


def _otlp_count(request, model: str) -> tuple[int, int]:
    """(data points of tensorgate.requests for `model`, their sum) in one OTLP export."""
    points = [p for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == "tensorgate.requests" for p in m.sum.data_points
              if any(kv.key == "model" and kv.value.string_value == model for kv in p.attributes)]
    return len(points), sum(p.as_int for p in points)


def test_one_otlp_stream_carries_both_workers_counts(backends):
    from gateway.bench.otlp_receiver import GrpcReceiver

    receiver = GrpcReceiver()
    config = {"listen": "127.0.0.1:0", "pools": {"main": {"backends": [backends[0].grpc_address]}},
              "telemetry": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "otlp_interval_s": 0.5}}
    try:
        with WorkersProcess(config, workers=2) as process:
            first, second = connect_to(process.address, 0), connect_to(process.address, 1)
            for connection, count in ((first, 11), (second, 7)):
                for _ in range(count):
                    connection.client.infer("mlp", _scale_inputs(np.ones((1, 16))))
            first.close()
            second.close()

            def latest():
                exports = [_otlp_count(request, "mlp") for request, _ in receiver.received()]
                return exports[-1] if exports else None

            # One series (one backend, status OK) holding both workers' requests, in one export stream.
            assert poll(latest, (1, 18)) == (1, 18)
            assert all(points <= 1 for points, _ in (_otlp_count(r, "mlp") for r, _ in receiver.received()))
    finally:
        receiver.stop()
