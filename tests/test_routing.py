"""Routing promises of the README through the real gateway, with stock clients: pools in
preference order, spill to the next pool, failover across pools, UNAVAILABLE when no backend is
healthy, and the routing-decision metric with its `preferred`, `spill` and `failover` labels.

Each pool's backend is a real Triton behind a proxy (tests/servers.py) that counts what reaches it,
can hold requests in flight, and can go away and come back on the same port like a backend
process that dies and returns.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.testing import GatewayThread
from tests.servers import UpstreamProxy, sample, scrape
from tests.waiting import wait_until

DECISIONS = "tensorgate_routing_decisions_total"


@pytest.fixture
def proxies(tritons):
    """One proxy in front of each shared Triton: the backends of pools `primary` and `secondary`."""
    servers = [UpstreamProxy(triton.grpc_address) for triton in tritons]
    yield servers
    for server in servers:
        server.close()


def _config(primary: UpstreamProxy, secondary: UpstreamProxy, **extra) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [primary.address]}, "secondary": {"backends": [secondary.address]}},
        "health": {"interval_s": 0.1, "timeout_s": 2.0, "unhealthy_after": 2},
        "batching": {"default": {"enabled": False}},  # one upstream message per request: counts are exact
        "telemetry": {"prometheus_port": 0, "prometheus_host": "127.0.0.1"},
        "upstream": {"transport": "grpc-stream"},  # the proxies speak gRPC
        **extra,
    }


def _infer(address: str, model: str = "simple_scale", value: float = 1.0, version: str = ""):
    client = triton_grpc.InferenceServerClient(address)
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1") if model == "add_sub" else ("INPUT0",):
            tensor = triton_grpc.InferInput(name, [1, 16], "FP32")
            tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
            inputs.append(tensor)
        return client.infer(model, inputs, model_version=version, client_timeout=30)
    finally:
        client.close()


def _health(gateway: GatewayThread, proxy: UpstreamProxy) -> str:
    return gateway.snapshot()["backends"][proxy.address]["health"]


def _decisions(gateway: GatewayThread) -> dict[str, int]:
    return gateway.snapshot()["routing"]


def test_pools_in_preference_order_and_spill_to_the_next(proxies):
    primary, secondary = proxies
    routes = {"simple_scale": {"pools": ["primary", "secondary"]}, "add_sub": {"pools": ["secondary", "primary"]}}
    with GatewayThread(_config(primary, secondary, models=routes)) as gateway:
        port = gateway.gateway.telemetry.prometheus_port
        # Each model goes to the first pool of its own order, and only there.
        for _ in range(5):
            assert _infer(gateway.address, "simple_scale", 2.0).as_numpy("OUTPUT0")[0, 0] == 4.0
            assert _infer(gateway.address, "add_sub").as_numpy("OUTPUT0")[0, 0] == 2.0
        assert (primary.forwarded, secondary.forwarded) == (5, 5)
        assert _decisions(gateway) == {"primary/preferred": 5, "secondary/preferred": 5}

        # The primary pool's only backend dies: simple_scale spills to the secondary pool, no error.
        primary.stop()
        wait_until(lambda: _health(gateway, primary) == "unhealthy", "the primary backend to leave rotation", timeout=20)
        for _ in range(4):
            assert _infer(gateway.address, "simple_scale", 2.0).as_numpy("OUTPUT0")[0, 0] == 4.0
        assert (primary.forwarded, secondary.forwarded) == (5, 5 + 4)
        assert _decisions(gateway)["secondary/spill"] == 4
        spilled = scrape(port)
        assert sample(spilled, DECISIONS, pool="secondary", reason="spill") == 4
        assert sample(spilled, DECISIONS, pool="primary", reason="preferred") == 5

        # It comes back: simple_scale returns to its preferred pool.
        primary.start()
        wait_until(lambda: _health(gateway, primary) == "healthy", "the primary backend to return", timeout=20)
        for _ in range(3):
            _infer(gateway.address, "simple_scale")
        assert (primary.forwarded, secondary.forwarded) == (5 + 3, 5 + 4)
        assert _decisions(gateway) == {"primary/preferred": 8, "secondary/preferred": 5, "secondary/spill": 4}
        assert not gateway.loop_errors


def test_failover_across_pools_of_requests_in_flight(proxies):
    """Requests in flight on the primary pool's backend when it dies are retried on the secondary
    pool: the clients see answers, never the failure."""
    primary, secondary = proxies
    in_flight = 4
    with GatewayThread(_config(primary, secondary)) as gateway:
        port = gateway.gateway.telemetry.prometheus_port
        _infer(gateway.address)  # the model is known and the primary's stream is open
        primary.hold()
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            futures = [pool.submit(_infer, gateway.address, "simple_scale", float(i)) for i in range(in_flight)]
            wait_until(lambda: primary.held == in_flight, f"{in_flight} requests held at the primary backend", timeout=20)
            primary.stop()  # dies with them in flight
            results = [future.result(30) for future in futures]
        assert [r.as_numpy("OUTPUT0")[0, 0] for r in results] == [2.0 * i for i in range(in_flight)]
        assert (primary.forwarded, secondary.forwarded) == (1, in_flight)
        decisions = _decisions(gateway)
        assert decisions["secondary/failover"] == in_flight, decisions
        assert sample(scrape(port), DECISIONS, pool="secondary", reason="failover") == in_flight
        assert not gateway.loop_errors


def test_unavailable_when_no_backend_is_healthy(proxies):
    only = proxies[0]
    config = _config(only, only)
    config["pools"] = {"primary": {"backends": [only.address]}}
    with GatewayThread(config) as gateway:
        for version in ("", "1"):
            assert _infer(gateway.address, version=version).as_numpy("OUTPUT0")[0, 0] == 2.0
        only.stop()
        wait_until(lambda: _health(gateway, only) == "unhealthy", "the backend to leave rotation", timeout=20)
        for version, message in (("1", "model 'simple_scale' version 1: no healthy backend can serve it now"),
                                 # the default version is looked up again when the fleet changes
                                 ("", "model 'simple_scale': no backend answered for its metadata")):
            with pytest.raises(triton_grpc.InferenceServerException) as error:
                _infer(gateway.address, version=version)
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            assert message in error.value.message()
        only.start()
        wait_until(lambda: _health(gateway, only) == "healthy", "the backend to return", timeout=20)
        for version in ("", "1"):
            assert _infer(gateway.address, version=version).as_numpy("OUTPUT0")[0, 0] == 2.0
        assert not gateway.loop_errors
