"""Drift promises of the README, through the real gateway: sampling at the stated fraction, alerts
that reach a webhook, references from a saved profile (`tensorgate drift report --save-profile`),
and admin calls that really change the reference."""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.protocol import pb
from gateway.testing import GatewayThread

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


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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
        counted = gateway.call(lambda: {model: (monitor.sampled, monitor.tensors[("input", "INPUT0")]._learned_rows)
                                        for model, monitor in gateway.gateway.drift.monitors.items()})
    assert counted == {"simple_scale": (30, 30 * rows), "add_sub": (40, 40 * rows), "mlp": (75, 75 * rows)}
