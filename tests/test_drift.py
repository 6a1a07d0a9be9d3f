"""Drift monitoring: detection through the real gateway, false alarms, robustness, sinks that never block."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.protocol import pb
from gateway.testing import GatewayThread
from tests.waiting import wait_until_async

FEATURES = 16
ROWS = 64


def _request(block: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="simple_scale")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(block.shape))
    request.raw_input_contents.append(block.astype(np.float32).tobytes())
    return request.SerializeToString()


def _send(address: str, blocks) -> float:
    """Send the blocks in order, 8 in flight; return the slowest request's seconds."""

    async def run():
        slowest = 0.0
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for start in range(0, len(blocks), 8):
                began = time.perf_counter()
                await asyncio.gather(*(call(_request(b), timeout=10) for b in blocks[start:start + 8]))
                slowest = max(slowest, time.perf_counter() - began)
        return slowest

    return asyncio.run(run())


def _blocks(rng, count: int, shift: float = 0.0, feature: int = 3) -> list[np.ndarray]:
    blocks = [rng.standard_normal((ROWS, FEATURES)) for _ in range(count)]
    for block in blocks:
        block[:, feature] += shift
    return blocks


def test_half_sigma_shift_of_one_feature_alerts_within_two_windows(tritons, tmp_path):
    reference = np.random.default_rng(1).standard_normal((20_000, FEATURES)).astype(np.float32)
    np.save(tmp_path / "training.npy", reference)
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {
            "capture_dir": str(tmp_path / "captures"),
            "models": {"simple_scale": {"inputs": ["INPUT0"], "window_rows": 5000,
                                        "reference": {"file": str(tmp_path / "training.npy")}}},
        },
    }
    rng = np.random.default_rng(2)
    with GatewayThread(config) as gateway:
        _send(gateway.address, _blocks(rng, 160))  # 10,240 rows as trained: two full windows
        assert gateway.call(lambda: gateway.gateway.drift.alerts()) == []
        _send(gateway.address, _blocks(rng, 2 * 5000 // ROWS, shift=0.5))  # two windows, shifted
        alerts = gateway.call(lambda: gateway.gateway.drift.alerts())
        report = gateway.call(lambda: gateway.gateway.drift.report("simple_scale"))
        _check_admin_api_and_cli(gateway.address, tmp_path)
    raised = [a for a in alerts if a["level"] != "ok"]
    assert raised, "a 0.5σ shift must raise an alert within two windows"
    assert {a["feature"] for a in raised} == {3}, raised
    assert all(a["tensor"] == "input/INPUT0" for a in raised)
    flagged = [f for f in report["features"] if f["level"] != "ok"]
    assert [f["feature"] for f in flagged] == [3]
    # Written by a worker thread; the gateway's stop waited for them.
    captures = sorted((tmp_path / "captures" / "simple_scale").iterdir())
    assert captures
    evidence = json.loads((captures[0] / "report.json").read_text())
    assert evidence["alert"]["feature"] == 3
    assert "input/INPUT0" in evidence["report"]["histograms"]
    with np.load(captures[0] / "sample.npz") as sample:
        assert sample["input__INPUT0"].shape[1] == FEATURES


def _fake_request(block: np.ndarray):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP64", shape=list(block.shape))
    request.raw_input_contents.append(np.ascontiguousarray(block, np.float64).tobytes())
    return request


def test_two_hundred_quiet_windows_raise_at_most_one_alert():
    """Monitor-level (no gateway): 1,000,000 rows from the reference distribution."""
    fired = []
    monitor = ModelMonitor("m", ModelDriftConfig(window_rows=5000, reference=ReferenceConfig(learn_rows=20_000)),
                           fired.append, reservoir_rows=10)
    rng = np.random.default_rng(5)
    for _ in range(20 + 200 * 5):  # 20 blocks learn the reference, then 200 windows of 5 blocks
        monitor.observe(_fake_request(rng.standard_normal((1000, FEATURES))), None)
    assert monitor.windows_evaluated >= 200 * 5 - 5  # the window slides every sub-window
    raised = [a for a in fired if a["level"] != "ok"]
    assert len(raised) <= 1, raised


def test_hostile_values_are_counted_not_crashed():
    fired = []
    config = ModelDriftConfig(window_rows=100, sub_windows=2, bins=16, reference=ReferenceConfig(learn_rows=5))
    monitor = ModelMonitor("m", config, fired.append, reservoir_rows=10)
    constant = np.ones((5, 3))  # a constant feature and fewer reference rows than bins
    monitor.observe(_fake_request(constant), None)
    tensor = monitor.tensors[("input", "X")]
    assert tensor.reference is not None
    weird = np.array([[np.nan, np.inf, -np.inf], [1e300, -1e300, 1.0], [1.0, 1.0, 1.0]] * 40)
    monitor.observe(_fake_request(weird), None)  # 120 rows: two sub-windows of 50, 20 rows over
    monitor.observe(_fake_request(np.empty((0, 3))), None)  # an empty block
    monitor.observe(_fake_request(weird), None)  # 120 more: two more sub-windows, 40 rows over
    # Every value counted — a bin, below/above, NaN or inf — in sub-windows of exactly 50 rows.
    assert tensor.window().sum() == config.window_rows * 3  # the last two sub-windows
    assert tensor.observed.sum() == 4 * 50 * 3  # every closed sub-window
    assert monitor.last_report is not None
    for feature in monitor.last_report["features"]:
        statistics = dict(feature["statistics"])
        # chi² is +inf where the window has values in a bin the reference never saw (SciPy's
        # chisquare and Evidently say the same), and its p-value 0 then
        assert statistics.pop("chi_square") >= 0 and not (statistics["chi_square_p"] > 0 and np.isinf(feature["statistics"]["chi_square"]))
        assert all(np.isfinite(v) or np.isnan(v) for v in statistics.values())


def _hanging_server():
    """A TCP server that accepts and never answers (a webhook receiver that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


@pytest.mark.parametrize("receiver", ["hangs", "refuses"])
def test_webhook_that_hangs_or_refuses_never_slows_requests(tritons, receiver):
    if receiver == "hangs":
        listener, accepted = _hanging_server()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/alerts"
    else:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/alerts"
        probe.close()  # nothing listens there: connections are refused
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"webhook": url, "models": {"simple_scale": {
            "window_rows": 640, "sub_windows": 1, "consecutive": 1,
            "thresholds": {"psi": [0.0, 0.0]},  # every window alerts: the webhook is always busy
            "reference": {"learn_rows": 640}}}},
    }
    rng = np.random.default_rng(3)
    with GatewayThread(config) as gateway:
        slowest = _send(gateway.address, _blocks(rng, 120))
        alerts = gateway.call(lambda: len(gateway.gateway.drift.alerts()))
    assert alerts > 0
    assert slowest < 1.0, f"a request waited {slowest:.2f} s behind the webhook"


def _check_admin_api_and_cli(address: str, tmp_path) -> None:
    """The admin gRPC service and `tensorgate drift report` see the same drift."""
    import subprocess
    import sys

    from gateway.admin.drift_service import SERVICE, messages as admin_messages

    plot = tmp_path / "drift.png"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "drift", "report", "--gateway", address, "simple_scale", "--plot", str(plot)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if "input/INPUT0" in line]
    assert "  3  " in table[0] and table[0].rstrip().endswith(("alert", "warning")), table[0]  # most drifted first
    assert plot.stat().st_size > 10_000
    messages = admin_messages()
    with grpc.insecure_channel(address) as channel:
        def call(method, request, response):
            return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=messages[response].FromString)(request, timeout=10)

        listed = call("ListAlerts", messages["ListAlertsRequest"](model="simple_scale"), "ListAlertsResponse")
        assert {a.feature for a in listed.alerts} == {3}
        with pytest.raises(grpc.RpcError) as error:
            call("GetDriftReport", messages["DriftReportRequest"](model="mlp"), "DriftReport")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        answer = call("SetReference", messages["SetReferenceRequest"](model="simple_scale", from_current_window=True),
                      "SetReferenceResponse")
        assert "current window" in answer.message
        answer = call("ResetReference", messages["ResetReferenceRequest"](model="simple_scale"), "SetReferenceResponse")
        assert "learning" in answer.message


def test_reservoir_keeps_a_uniform_sample():
    from gateway.drift.reservoir import Reservoir

    kept = np.zeros(10_000)
    for trial in range(200):
        reservoir = Reservoir(100, seed=trial)
        for start in range(0, 10_000, 7):  # requests of 7 rows
            reservoir.offer({"x": np.arange(start, min(start + 7, 10_000)).reshape(-1, 1)})
        sample = reservoir.arrays()["x"][:, 0]
        assert len(sample) == 100 and len(set(sample)) == 100
        kept[sample] += 1
    # Every tenth of the stream holds about a tenth of the kept rows (expected 2,000 of 20,000).
    per_tenth = kept.reshape(10, -1).sum(axis=1)
    assert np.all(np.abs(per_tenth - 2000) < 250), per_tenth


def _bytes_request(words: list[bytes]):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(words), 1])
    request.raw_input_contents.append(b"".join(len(w).to_bytes(4, "little") + w for w in words))
    return request


def test_categorical_bytes_tensor_drift_is_detected():
    """A BYTES input whose category mix changes raises an alert; values of any length are fine."""
    fired = []
    config = ModelDriftConfig(window_rows=2000, reference=ReferenceConfig(learn_rows=2000))
    monitor = ModelMonitor("m", config, fired.append, reservoir_rows=10)
    rng = np.random.default_rng(0)
    usual = [b"cat", b"dog", b"", b"x" * 10_000, "h\u00e9llo".encode()]
    for _ in range(60):  # reference, then quiet windows: no alert
        monitor.observe(_bytes_request([usual[i] for i in rng.integers(0, 5, 100)]), None)
    assert [a for a in fired if a["level"] != "ok"] == []
    assert monitor.tensors[("input", "TEXT")].reference.sum() == 2000
    novel = usual + [b"parrot", b"llama"]
    for _ in range(60):  # new categories take most of the traffic
        monitor.observe(_bytes_request([novel[i] for i in rng.integers(3, 7, 100)]), None)
    raised = [a for a in fired if a["level"] != "ok"]
    assert raised and raised[0]["tensor"] == "input/TEXT" and raised[0]["statistic"] == "psi"


def test_outputs_and_sampling(tritons):
    """Outputs are watched too, and sample_rate counts only that share of the requests."""
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"models": {"add_sub": {"outputs": ["OUTPUT1"], "sample_rate": 0.5,
                                         "reference": {"learn_rows": 100_000}}}},
    }
    rng = np.random.default_rng(4)

    def request():
        message = pb.ModelInferRequest(model_name="add_sub")
        for name in ("INPUT0", "INPUT1"):
            message.inputs.add(name=name, datatype="FP32", shape=[4, 16])
            message.raw_input_contents.append(rng.standard_normal((4, 16)).astype(np.float32).tobytes())
        return message.SerializeToString()

    async def send():
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(100):
                await call(request(), timeout=10)

    with GatewayThread(config) as gateway:
        asyncio.run(send())
        gateway.call(gateway.gateway.drift.flush)
        tensors = gateway.call(lambda: {k: m._learned_rows for k, m in gateway.gateway.drift.monitors["add_sub"].tensors.items()})
    assert tensors == {("output", "OUTPUT1"): 200}  # 50 of 100 requests × 4 rows; inputs not watched


def test_wide_tensor_reductions_give_one_feature_per_channel():
    from gateway.drift.monitor import tensor_block

    images = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)  # [rows, C, H, W]
    mean = tensor_block("FP32", images.shape, images.tobytes(), (), "mean")
    np.testing.assert_allclose(mean, images.reshape(5, 3, -1).mean(axis=2), rtol=1e-6)
    l2 = tensor_block("FP32", images.shape, images.tobytes(), (), "l2")
    np.testing.assert_allclose(l2, np.linalg.norm(images.reshape(5, 3, -1), axis=2), rtol=1e-5)
    embeddings = images.reshape(5, -1)  # [rows, D]: one norm per row
    assert tensor_block("FP32", embeddings.shape, embeddings.tobytes(), (), "l2").shape == (5, 1)
    picked = tensor_block("FP32", embeddings.shape, embeddings.tobytes(), (0, 7), "none")
    np.testing.assert_array_equal(picked, embeddings[:, [0, 7]])


def test_npz_reference_and_windows_by_time(tmp_path):
    """A reference from a training .npz, and sub-windows closed by time for a quiet model."""
    from gateway.drift.stage import DriftStage
    from gateway.drift.config import DriftConfig

    training = np.random.default_rng(1).standard_normal((5000, 4))
    np.savez(tmp_path / "training.npz", X=training)
    config = DriftConfig(models={"m": ModelDriftConfig(
        window_rows=1_000_000, sub_windows=2, window_seconds=0.2,
        reference=ReferenceConfig(file=str(tmp_path / "training.npz")))})
    stage = DriftStage(config)
    monitor = stage.monitors["m"]
    tensor = monitor.tensors[("input", "X")]
    assert tensor.reference.sum() == training.size  # every value of the file in the reference
    for _ in range(3):  # a trickle: far below window_rows, so only time closes the sub-windows
        monitor.observe(_fake_request(np.random.default_rng(2).standard_normal((10, 4))), None)
        time.sleep(0.11)
    assert monitor.windows_evaluated >= 1


# ---- one compiled update per event-loop turn ----------------------------------------------------

def _monitor(sample_rate: float = 1.0) -> ModelMonitor:
    config = ModelDriftConfig(window_rows=400, sample_rate=sample_rate, reference=ReferenceConfig(learn_rows=200))
    return ModelMonitor("m", config, lambda alert: None, reservoir_rows=64)


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_observing_many_requests_at_once_counts_what_observing_each_counts(sample_rate):
    rng = np.random.default_rng(5)
    requests = [_fake_request(rng.standard_normal((rows, 3))) for rows in rng.integers(1, 5, 300)]
    one_by_one, together = _monitor(sample_rate), _monitor(sample_rate)
    for request in requests:
        one_by_one.observe(request, None)
    for start in range(0, len(requests), 17):
        together.observe_many([(request, None) for request in requests[start:start + 17]])
    assert together.sampled == one_by_one.sampled == round(len(requests) * sample_rate)
    a, b = one_by_one.tensors[("input", "X")], together.tensors[("input", "X")]
    assert np.array_equal(a.reference, b.reference) and np.array_equal(a.edges, b.edges)
    assert np.array_equal(a.observed, b.observed)  # every sampled row counted, in the same bins


def _exchange(request, model: str = "m"):
    from gateway.pipeline.exchange import Exchange, ModelEntry
    from gateway.protocol.tensors import ModelSignature

    return Exchange(ModelEntry(model, "1", ModelSignature(model, "1", {}, {}, 8, False, False, None)), request, 0)


def _stage(model_config: dict | None = None):
    from gateway.configfile import load_dataclass
    from gateway.drift.config import DriftConfig
    from gateway.drift.stage import DriftStage

    stage = DriftStage(load_dataclass(DriftConfig, {"models": {"m": {"window_rows": 400, **(model_config or {})}}}))
    monitor = stage.monitors["m"]
    calls = []
    observe_many = monitor.observe_many
    monitor.observe_many = lambda finished: (  # (requests, batches) counted in each call
        calls.append((sum(len(item) == 2 for item in finished), sum(len(item) == 3 for item in finished))),
        observe_many(finished))
    return stage, monitor, calls


async def test_the_drift_stage_counts_waiting_requests_in_one_update(monkeypatch):
    """Finished requests are counted together: FLUSH_AFTER_S after the first, or at once (next loop
    turn) when FLUSH_REQUESTS wait; a report counts what waits before it answers."""
    from gateway.drift import stage as stage_module
    from gateway.drift.stage import FLUSH_REQUESTS

    # 0.5 s instead of 20 ms: a busy machine may stall the three turns below for more than 20 ms.
    FLUSH_AFTER_S = 0.5
    monkeypatch.setattr(stage_module, "FLUSH_AFTER_S", FLUSH_AFTER_S)
    stage, monitor, calls = _stage()
    rng = np.random.default_rng(6)
    first = time.monotonic()
    for _ in range(3):  # three event-loop turns of 8 requests each
        for _ in range(8):
            stage.observer(_exchange(_fake_request(rng.standard_normal((1, 3)))), None, None)
        await asyncio.sleep(0)
    assert calls == []  # waiting
    await wait_until_async(lambda: calls, "the timer's count", timeout=10, step=0.01)
    assert time.monotonic() - first >= FLUSH_AFTER_S - 0.01  # counted by the timer, not before
    assert calls == [(24, 0)] and monitor.sampled == 24
    for _ in range(FLUSH_REQUESTS + 44):  # one turn of more than FLUSH_REQUESTS: counted on the next turn
        stage.observer(_exchange(_fake_request(rng.standard_normal((1, 3)))), None, None)
    await asyncio.sleep(0)
    assert calls == [(24, 0), (FLUSH_REQUESTS + 44, 0)]
    stage.observer(_exchange(_fake_request(rng.standard_normal((1, 3)))), None, None)
    assert stage.report("m") and calls[-1] == (1, 0) and monitor.sampled == 24 + FLUSH_REQUESTS + 45
    await asyncio.sleep(FLUSH_AFTER_S * 3)
    assert len(calls) == 3  # the report's flush took the timer's work: nothing counted twice


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
async def test_a_batch_counts_once_for_its_requests_and_as_they_would(sample_rate):
    """The batching stage's merged batch is counted once (batch_observer), its requests not again
    (their Exchange.merged is set), and the windows hold exactly what counting each request
    would; with a sample rate below 1 every request is sampled on its own instead."""
    from gateway.batching.merge import merge

    config = {"sample_rate": sample_rate, "reference": {"learn_rows": 200}}
    stage, monitor, calls = _stage(config)
    alone, _, _ = _stage(config)
    rng = np.random.default_rng(7)
    for _ in range(80):  # 80 turns: a batch of 6 requests (2 rows each) and one request sent alone
        requests = [_fake_request(rng.standard_normal((2, 3))) for _ in range(6)]
        batch = _exchange(merge(requests, [2] * 6))
        members = [_exchange(request) for request in requests]
        batch.members = members
        for member in members:
            member.took_batch(batch)
        single = _exchange(_fake_request(rng.standard_normal((1, 3))))
        stage.batch_observer(batch, None)  # before the members' responses are handed out, as the dispatcher does
        for exchange in [*members, single]:
            stage.observer(exchange, None, None)
            alone.observer(_exchange(exchange.request), None, None)
        stage.flush()
    alone.flush()
    assert calls == ([(1, 1)] if sample_rate == 1.0 else [(7, 0)]) * 80
    assert monitor.sampled == alone.monitors["m"].sampled == 560 * sample_rate
    a, b = monitor.tensors[("input", "X")], alone.monitors["m"].tensors[("input", "X")]
    assert np.array_equal(a.reference, b.reference) and np.array_equal(a.edges, b.edges)
    assert a.observed.sum() > 0 and np.array_equal(a.observed, b.observed)


async def test_requests_and_batches_are_counted_in_the_order_they_were_answered():
    """One flush can hold requests answered alone and merged batches from many loop turns; the
    reference is learned from the first rows answered, so they must be counted in that order (a
    flush that counted its batches first learned rows answered after the reference's last)."""
    from gateway.batching.merge import merge

    config = {"reference": {"learn_rows": 200}}
    stage, monitor, _ = _stage(config)
    alone, _, _ = _stage(config)
    rng = np.random.default_rng(8)
    for turn in range(60):  # a request alone, then a batch of 3 (2 rows each); the rows drift by turn
        single = _exchange(_fake_request(rng.standard_normal((2, 3)) + turn))
        requests = [_fake_request(rng.standard_normal((2, 3)) + turn + 0.5) for _ in range(3)]
        batch = _exchange(merge(requests, [2] * 3))
        batch.members = [_exchange(request) for request in requests]
        for member in batch.members:
            member.took_batch(batch)
        stage.observer(single, None, None)
        stage.batch_observer(batch, None)
        for exchange in [single, *batch.members]:
            alone.observer(_exchange(exchange.request), None, None)
            alone.flush()  # each request counted on its own, in order
    stage.flush()  # all 60 turns in one count
    a, b = monitor.tensors[("input", "X")], alone.monitors["m"].tensors[("input", "X")]
    assert np.array_equal(a.reference, b.reference) and np.array_equal(a.edges, b.edges)
    assert np.array_equal(a.observed, b.observed)


async def test_a_capture_being_written_is_on_disk_when_the_sink_closes(tmp_path):
    """The capture of an alert raised just before a stop: close() waits for the writer thread, so
    the evidence for retraining is not lost with the process."""
    from gateway.drift.sinks import CaptureSink

    rows = np.arange(12.0).reshape(4, 3)
    sink = CaptureSink(str(tmp_path), lambda model: ({"model": model}, {"input/X": rows}))
    write = sink._write
    sink._write = lambda *args: (time.sleep(0.3), write(*args))  # a slow disk
    sink({"model": "m", "level": "alert", "time": time.time(), "tensor": "input/X", "feature": 1, "statistic": "psi"})
    sink({"model": "m", "level": "ok", "time": time.time(), "tensor": "input/X", "feature": 1, "statistic": "psi"})
    assert sink.written == []  # being written, off the loop
    await sink.close()
    [target] = sink.written
    with np.load(f"{target}/sample.npz") as sample:
        np.testing.assert_array_equal(sample["input__X"], rows)
    assert json.loads((tmp_path / target / "report.json").read_text())["alert"]["feature"] == 1
