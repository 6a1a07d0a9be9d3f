"""Drift promises of the README, through the real gateway: sampling at the stated fraction, alerts
that reach a webhook, references from a saved profile (`tensorgate drift report --save-profile`),
and admin calls that really change the reference."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import grpc
import numpy as np
import pytest

from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.protocol import pb
from gateway.testing import GatewayThread
from tests.waiting import wait_until

FEATURES = 16


def _request(model: str, block: np.ndarray, inputs=("INPUT0",)) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    for name in inputs:
        request.inputs.add(name=name, datatype="FP32", shape=list(block.shape))
        request.raw_input_contents.append(block.astype(np.float32).tobytes())
    return request.SerializeToString()


def _send(address: str, requests: list[bytes], in_flight: int = 8) -> None:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for start in range(0, len(requests), in_flight):
                await asyncio.gather(*(call(r, timeout=10) for r in requests[start:start + in_flight]))

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ sampling

def _fake_request(rows: int = 2):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP64", shape=[rows, 3])
    request.raw_input_contents.append(np.zeros((rows, 3)).tobytes())
    return request


@pytest.mark.parametrize("rate", [0.3, 0.4, 0.6, 0.7, 0.75, 1 / 3, 0.01, 1.0])
def test_sample_rate_counts_that_fraction_of_requests_evenly(rate):
    """After every n requests exactly floor(n × rate) were counted: the stated fraction, spread evenly
    (the rate used to be rounded to 1/N: 0.7 and 0.75 counted every request, 0.4 and 0.6 half)."""
    config = ModelDriftConfig(sample_rate=rate, reference=ReferenceConfig(learn_rows=10**9))
    monitor = ModelMonitor("m", config, lambda alert: None, reservoir_rows=10)
    for seen in range(1, 1001):
        monitor.observe(_fake_request(), None)
        assert monitor.sampled == math.floor(seen * rate + 1e-9), (seen, monitor.sampled)
    assert monitor.tensors[("input", "X")]._learned_rows == 2 * monitor.sampled


def test_sample_rates_through_the_gateway(tritons):
    rates = {"simple_scale": 0.3, "add_sub": 0.4, "mlp": 0.75}
    sent, rows = 100, 4
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"models": {model: {"inputs": ["INPUT0"], "sample_rate": rate, "reference": {"learn_rows": 10**6}}
                             for model, rate in rates.items()}},
    }
    rng = np.random.default_rng(0)
    requests = [_request(model, rng.standard_normal((rows, FEATURES)), ("INPUT0", "INPUT1") if model == "add_sub" else ("INPUT0",))
                for _ in range(sent) for model in rates]
    with GatewayThread(config) as gateway:
        _send(gateway.address, requests)
        gateway.call(gateway.gateway.drift.flush)
        counted = gateway.call(lambda: {model: (monitor.sampled, monitor.tensors[("input", "INPUT0")]._learned_rows)
                                        for model, monitor in gateway.gateway.drift.monitors.items()})
    assert counted == {"simple_scale": (30, 30 * rows), "add_sub": (40, 40 * rows), "mlp": (75, 75 * rows)}


# ------------------------------------------------------------------------------------------ alerts

def test_webhook_receives_each_alert(tritons):
    """A real HTTP receiver gets each alert the gateway raises, as JSON, as the gateway recorded it."""
    from tests.servers import HttpRecorder

    receiver = HttpRecorder()
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"webhook": receiver.url("/hooks/drift"), "models": {"simple_scale": {
            "inputs": ["INPUT0"], "window_rows": 256, "sub_windows": 1, "consecutive": 1,
            "features": {"INPUT0": [0, 5]}, "reference": {"learn_rows": 256}}}},
    }
    rng = np.random.default_rng(3)
    try:
        with GatewayThread(config) as gateway:
            reference = [rng.standard_normal((64, FEATURES)) for _ in range(4)]
            shifted = [rng.standard_normal((64, FEATURES)) + 3.0 for _ in range(4)]  # 3σ off: a window that alerts
            # one after the other: sent 8 in flight together, the drift observer saw them in the order
            # Triton answered, and a reference of mixed blocks failed this test (2 runs in 5 on main)
            _send(gateway.address, [_request("simple_scale", b) for b in reference])
            _send(gateway.address, [_request("simple_scale", b) for b in shifted])
            raised = wait_until(lambda: gateway.call(lambda: [a for a in gateway.gateway.drift.alerts() if a["level"] != "ok"]),
                                "the alerts", 10)
            wait_until(lambda: len(receiver.posts) >= len(raised), f"{len(raised)} webhook posts", 10)
            assert not gateway.loop_errors
    finally:
        receiver.close()
    assert {(a["feature"], a["statistic"], a["level"]) for a in raised} == {(0, "psi", "alert"), (5, "psi", "alert")}
    assert [body for _, _, body in receiver.posts] == json.loads(json.dumps(raised))  # each alert, as recorded
    for path, headers, body in receiver.posts:
        assert path == "/hooks/drift" and headers["Content-Type"] == "application/json"
        assert body["model"] == "simple_scale" and body["tensor"] == "input/INPUT0"
        assert body["value"] > body["thresholds"][1] == 0.25


# -------------------------------------------------------------------------------------- references

def _admin(address: str, method: str, request_type: str, response_type: str, **fields):
    from gateway.admin.drift_service import SERVICE, messages as admin_messages

    messages = admin_messages()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=messages[response_type].FromString)
        return call(messages[request_type](**fields), timeout=10)


def _report(address: str, model: str = "simple_scale"):
    report = _admin(address, "GetDriftReport", "DriftReportRequest", "DriftReport", model=model)
    return report, json.loads(report.histograms_json)


def _psi_by_feature(report) -> dict[int, float]:
    return {f.feature: f.statistics["psi"] for f in report.features}


def _send_rows(address: str, rng, rows: int, shift: float) -> None:
    _send(address, [_request("simple_scale", rng.standard_normal((64, FEATURES)) + shift) for _ in range(rows // 64)])


def _windows(address: str) -> int:
    return _report(address)[0].windows_evaluated


WINDOW = 640
DRIFT = {"inputs": ["INPUT0"], "window_rows": WINDOW, "sub_windows": 1}


def test_set_and_reset_reference_change_the_next_reports(tritons):
    """SetReference and ResetReference over the admin API, judged by what the next reports compute."""
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
              "drift": {"models": {"simple_scale": {**DRIFT, "reference": {"learn_rows": WINDOW}}}}}
    rng = np.random.default_rng(11)
    with GatewayThread(config) as gateway:
        address = gateway.address
        _send_rows(address, rng, WINDOW, 0.0)  # the reference, learned: N(0, 1)
        _send_rows(address, rng, WINDOW, 2.0)  # a window 2σ off
        wait_until(lambda: _windows(address) == 1, "the first window", 10)
        report, histograms = _report(address)
        assert min(_psi_by_feature(report).values()) > 1.0  # far off the learned reference
        shifted_window = histograms["input/INPUT0"]["current"]

        answer = _admin(address, "SetReference", "SetReferenceRequest", "SetReferenceResponse",
                        model="simple_scale", from_current_window=True)
        assert answer.message
        _, histograms = _report(address)
        assert histograms["input/INPUT0"]["reference"] == shifted_window  # the window is the reference now
        _send_rows(address, rng, WINDOW, 2.0)  # the same shifted distribution again
        wait_until(lambda: _windows(address) == 2, "the second window", 10)
        report, _ = _report(address)
        assert max(_psi_by_feature(report).values()) < 0.25  # no drift against the new reference
        assert {f.level for f in report.features} == {"ok"}

        _admin(address, "ResetReference", "ResetReferenceRequest", "SetReferenceResponse", model="simple_scale")
        assert _report(address)[1] == {}  # no reference until the next rows are learned
        _send_rows(address, rng, WINDOW, -2.0)  # learned anew, from N(-2, 1)
        _, histograms = _report(address)
        edges = np.array(histograms["input/INPUT0"]["edges"])
        assert np.all(np.sum(histograms["input/INPUT0"]["reference"], axis=1) == WINDOW)
        assert abs(np.median(edges) + 2.0) < 0.2  # quantile edges of the new reference, around -2
        _send_rows(address, rng, WINDOW, 2.0)
        wait_until(lambda: _windows(address) == 3, "the third window", 10)
        report, _ = _report(address)
        assert min(_psi_by_feature(report).values()) > 1.0  # 4σ from the relearned reference
        assert not gateway.loop_errors


def test_reference_from_a_profile_saved_by_drift_report(tritons, tmp_path):
    """`tensorgate drift report --save-profile` saves one gateway's current window; a second
    gateway whose reference is that profile compares its windows with exactly those counts."""
    from gateway.ext import drift as kernels

    profile_path = tmp_path / "profile.json"
    learn = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
             "drift": {"models": {"simple_scale": {**DRIFT, "reference": {"learn_rows": WINDOW}}}}}
    rng = np.random.default_rng(12)
    with GatewayThread(learn) as gateway:
        _send_rows(gateway.address, rng, WINDOW, 0.0)
        _send_rows(gateway.address, rng, WINDOW, 1.0)  # the window to save: N(1, 1)
        wait_until(lambda: _windows(gateway.address) == 1, "a window", 10)
        _, saved_from = _report(gateway.address)
        result = subprocess.run([sys.executable, "-m", "gateway", "drift", "report", "--gateway", gateway.address,
                                 "simple_scale", "--save-profile", str(profile_path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"saved to {profile_path}" in result.stdout
    profile = json.loads(profile_path.read_text())
    assert list(profile) == ["input/INPUT0"]
    assert profile["input/INPUT0"]["edges"] == saved_from["input/INPUT0"]["edges"]
    assert profile["input/INPUT0"]["reference"] == saved_from["input/INPUT0"]["current"]
    assert np.all(np.sum(profile["input/INPUT0"]["reference"], axis=1) == WINDOW)

    from_profile = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
                    "drift": {"models": {"simple_scale": {**DRIFT, "reference": {"profile": str(profile_path)}}}}}
    with GatewayThread(from_profile) as gateway:
        _, histograms = _report(gateway.address)
        assert histograms["input/INPUT0"]["reference"] == profile["input/INPUT0"]["reference"]  # before any traffic
        _send_rows(gateway.address, rng, WINDOW, 1.0)  # the profile's distribution: no reference rows to learn first
        wait_until(lambda: _windows(gateway.address) == 1, "a window", 10)
        report, histograms = _report(gateway.address)
        assert not gateway.loop_errors
    current = np.array(histograms["input/INPUT0"]["current"])
    want = kernels.population_stability_index(np.array(profile["input/INPUT0"]["reference"]), current)
    np.testing.assert_allclose([f.statistics["psi"] for f in sorted(report.features, key=lambda f: f.feature)], want,
                               rtol=1e-12)
    assert max(want) < 0.25  # the same distribution as the saved window


# -------------------------------------------------------------------------------------- batches

def test_batched_requests_are_counted_as_each_request_would_be(tritons):
    """Through the batching gateway, 64 in flight: the drift stage counts each merged batch once
    (not its requests one by one), and its window holds exactly the counts of a monitor fed the same
    rows request by request — every request counted once, none twice."""
    window = 2048
    drift = {"inputs": ["INPUT0"], "window_rows": window, "sub_windows": 1, "reference": {"learn_rows": window}}
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
              "batching": {"default": {"max_queue_delay_us": 2000}},
              "drift": {"models": {"simple_scale": drift}}}
    rng = np.random.default_rng(12)
    reference, shifted = rng.standard_normal((window, FEATURES)), rng.standard_normal((window, FEATURES)) + 0.3
    with GatewayThread(config) as gateway:
        _send(gateway.address, [_request("simple_scale", row[None]) for row in reference], in_flight=64)
        _send(gateway.address, [_request("simple_scale", row[None]) for row in shifted], in_flight=64)
        wait_until(lambda: _windows(gateway.address) == 1, "the window", 10)
        _, histograms = _report(gateway.address)
        batching = gateway.call(lambda: gateway.gateway.batching.snapshot())["simple_scale:1"]
        sampled = gateway.call(lambda: gateway.gateway.drift.monitors["simple_scale"].sampled)  # (_report flushed)
        assert not gateway.loop_errors
    # Many requests rode in merged batches (the rest went alone: both paths are counted here).
    assert batching["requests"] == 2 * window and batching["batches"] < 0.9 * batching["requests"], batching
    assert sampled == 2 * window

    one_by_one = ModelMonitor("simple_scale", ModelDriftConfig(**{**drift, "reference": ReferenceConfig(learn_rows=window)}),
                              lambda alert: None, reservoir_rows=16)
    for block in (reference, shifted):
        for row in block:
            one_by_one.observe(pb.ModelInferRequest.FromString(_request("simple_scale", row[None])), None)
    expected = one_by_one.histograms()["input/INPUT0"]
    assert histograms["input/INPUT0"]["edges"] == expected["edges"]
    assert histograms["input/INPUT0"]["reference"] == expected["reference"]
    assert histograms["input/INPUT0"]["current"] == expected["current"]
    assert np.sum(histograms["input/INPUT0"]["current"], axis=1).tolist() == [window] * FEATURES
