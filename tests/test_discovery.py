"""Backends discovered by DNS: they join and leave a pool live while requests keep succeeding.

Real parts throughout: a DNS server of the test's own on loopback UDP (tests/dns_server.py), three
real Triton servers on 127.0.0.2-4 sharing one gRPC port and one HTTP port (as the pods behind a
Kubernetes headless Service do), the real gateway on a real port, and tritonclient.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import threading

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.local.triton import LocalTriton, default_model_repository, find_free_ports
from gateway.upstream.config import DiscoveryConfig
from gateway.upstream.discovery import DnsDiscovery
from tests.conftest import gateway_on
from tests.dns_server import DnsServer
from tests.waiting import wait_until

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAME = "triton.models.test"
SLOW_S = 5.0  # long enough that the leaving backend still holds them when it starts draining

# A model that answers after DELAY seconds, with instances enough to hold several at once.
SLOW_CONFIG = """
name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "DELAY" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "DELAY_OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 3 } ]
"""
SLOW_MODEL = '''
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy()
            time.sleep(float(delay[0]))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("DELAY_OUT", delay.copy())]))
        return responses
'''


@pytest.fixture(scope="module")
def dns_server():
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pod_tritons(tmp_path_factory):
    """Three Tritons, one per loopback address, all on the same two ports."""
    repository = tmp_path_factory.mktemp("discovery-models")
    shutil.copytree(default_model_repository() / "simple_scale", repository / "simple_scale")
    (repository / "slow" / "1").mkdir(parents=True)
    (repository / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    (repository / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    http_port, grpc_port = find_free_ports(2)
    log_dir = tmp_path_factory.mktemp("discovery-logs")
    servers = [
        LocalTriton(repository, name=f"pod-{index}", log_dir=log_dir, host=host, grpc_port=grpc_port, http_port=http_port)
        for index, host in enumerate(HOSTS)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda server: server.start(), servers))
    yield servers
    for server in servers:
        server.stop()


def _config(dns_server, grpc_port: int, transport: str) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"pods": {"dns": f"{NAME}:{grpc_port}"}},
        "upstream": {
            "transport": transport,
            "discovery": {"nameservers": [dns_server.address], "interval_s": 0.2, "timeout_s": 1.0, "drain_s": 60},
        },
        "health": {"interval_s": 0.2, "timeout_s": 1.0},
        # No second chance elsewhere: a request the gateway breaks on a leaving backend fails the test.
        "routing": {"retry_unavailable": False},
    }


def _load(address: str, stop: threading.Event, outcomes: list) -> None:
    """simple_scale, one request after another, until `stop`; every outcome recorded."""
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    try:
        while not stop.is_set():
            try:
                result = client.infer("simple_scale", [tensor], client_timeout=20)
                outcomes.append(bool((result.as_numpy("OUTPUT0") == 2.0).all()) or "wrong answer")
            except triton_grpc.InferenceServerException as error:
                outcomes.append(error)
    finally:
        client.close()


def _slow(address: str, seconds: float):
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("DELAY", [1], "FP32")
    tensor.set_data_from_numpy(np.array([seconds], np.float32))
    try:
        return float(client.infer("slow", [tensor], client_timeout=60).as_numpy("DELAY_OUT")[0])
    finally:
        client.close()


@pytest.mark.parametrize(
    "front_door, transport",
    [("grpcio-uvloop", "http"), ("grpcio-asyncio", "grpc-stream"), ("envoy", "http")],
)
def test_backends_join_and_drain_live_under_load(dns_server, pod_tritons, front_door, transport):
    a, b, c = (f"{host}:{pod_tritons[0].grpc_port}" for host in HOSTS)
    dns_server.set(NAME, [HOSTS[0]])
    with gateway_on(front_door, _config(dns_server, pod_tritons[0].grpc_port, transport)) as gateway:
        def backends() -> dict:
            return gateway.snapshot()["backends"]

        # The first resolution happens before the gateway serves.
        assert {address: state["health"] for address, state in backends().items()} == {a: "healthy"}

        stop, outcomes = threading.Event(), []
        loaders = [threading.Thread(target=_load, args=(gateway.address, stop, outcomes)) for _ in range(2)]
        for loader in loaders:
            loader.start()
        try:
            wait_until(lambda: len(outcomes) > 20, "requests to flow through the one backend")

            # b appears in DNS: it joins the pool and takes requests.
            dns_server.set(NAME, [HOSTS[0], HOSTS[1]])
            wait_until(lambda: backends().get(b, {}).get("served", 0) > 10, f"{b} to serve requests")

            # Slow requests spread over a and b (the router picks the less loaded of the two) …
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                slow = [pool.submit(_slow, gateway.address, SLOW_S) for _ in range(4)]
                wait_until(lambda: backends()[a]["outstanding"] >= 1 and backends()[b]["outstanding"] >= 1,
                           "slow requests in flight on both backends", timeout=10)
                # … then a leaves DNS: it drains (no new requests) while its slow ones finish.
                dns_server.set(NAME, [HOSTS[1]])
                wait_until(lambda: backends().get(a, {}).get("health") == "draining", f"{a} to drain", timeout=10)
                seen = backends().get(a, {})
                assert seen.get("outstanding", 0) >= 1, f"the draining backend still holds its requests: {seen}"
                assert [future.result(timeout=60) for future in slow] == [SLOW_S] * 4
            wait_until(lambda: a not in backends(), f"{a} to drain and leave the pool")

            # c appears: it serves too; the pool is now b and c.
            dns_server.set(NAME, [HOSTS[1], HOSTS[2]])
            wait_until(lambda: backends().get(c, {}).get("served", 0) > 10, f"{c} to serve requests")
            assert set(backends()) == {b, c}
        finally:
            stop.set()
            for loader in loaders:
                loader.join(30)

        failures = [outcome for outcome in outcomes if outcome is not True]
        assert not failures, f"{len(failures)} of {len(outcomes)} requests failed while backends came and went: {failures[:3]}"
        assert not gateway.take_loop_errors()


def test_dns_outage_keeps_the_backends_and_an_empty_answer_drains_them(dns_server, pod_tritons):
    a = f"{HOSTS[0]}:{pod_tritons[0].grpc_port}"
    dns_server.set(NAME, [HOSTS[0]])
    with gateway_on("grpcio-uvloop", _config(dns_server, pod_tritons[0].grpc_port, "http")) as gateway:
        def discovery() -> dict:
            return gateway.snapshot()["discovery"]["pods"]

        assert discovery()["dns"] == f"{NAME}:{pod_tritons[0].grpc_port}" and discovery()["resolutions"] >= 1
        for mode in ("silent", "refuse"):
            setattr(dns_server, mode, True)
            try:
                failures_before = discovery()["failures"]
                wait_until(lambda: discovery()["failures"] >= failures_before + 2, f"DNS to fail ({mode}) twice", timeout=20)
                assert discovery()["last_error"]
                assert _slow(gateway.address, 0.0) == 0.0
                assert {k: v["health"] for k, v in gateway.snapshot()["backends"].items()} == {a: "healthy"}
            finally:
                setattr(dns_server, mode, False)

        # The name answers with no address (a Service scaled to zero): the backend leaves.
        dns_server.set(NAME, [])
        wait_until(lambda: not gateway.snapshot()["backends"], "the pool to empty")
        with pytest.raises(triton_grpc.InferenceServerException) as refused:
            _slow(gateway.address, 0.0)
        # No backend left to report the model: unknown, as with any model no backend serves.
        assert refused.value.status() == "StatusCode.NOT_FOUND"
        assert "available models: none" in refused.value.message()
        # It comes back.
        dns_server.set(NAME, [HOSTS[0]])
        wait_until(lambda: gateway.snapshot()["backends"].get(a, {}).get("health") == "healthy", f"{a} to come back")
        assert _slow(gateway.address, 0.0) == 0.0


# ---- the resolver on its own, against the same server ---------------------------------------------


def _resolve(dns_server, target: str, **config):
    discovery = DnsDiscovery(target, DiscoveryConfig(nameservers=(dns_server.address,), **config))
    return asyncio.run(discovery.resolve())


def test_resolver_answers(dns_server):
    dns_server.set("two.test", ["127.0.0.2", "127.0.0.3"])
    assert _resolve(dns_server, "two.test:8001") == {"127.0.0.2:8001", "127.0.0.3:8001"}
    dns_server.set("six.test", ["::1"])  # no A record: the AAAA records count
    assert _resolve(dns_server, "six.test:8001") == {"[::1]:8001"}
    dns_server.set("empty.test", [])
    assert _resolve(dns_server, "empty.test:8001") == frozenset()
    assert _resolve(dns_server, "missing.test:8001") == frozenset()  # NXDOMAIN: no backends


def test_resolver_without_an_answer_says_so(dns_server):
    dns_server.set("flaky.test", ["127.0.0.2"])
    dns_server.silent = True
    try:
        assert _resolve(dns_server, "flaky.test:8001", timeout_s=0.3) is None
    finally:
        dns_server.silent = False
    dns_server.refuse = True
    try:
        assert _resolve(dns_server, "flaky.test:8001") is None
    finally:
        dns_server.refuse = False


def test_pool_config_names_what_is_wrong():
    base = {"listen": "127.0.0.1:0"}
    config = config_from_mapping({**base, "pools": {"gpu": {"dns": "triton-gpu.models.svc:8001"}}})
    assert config.pools["gpu"].dns == "triton-gpu.models.svc:8001" and config.pools["gpu"].backends == ()
    cases = {
        "pools.gpu.backends": {"gpu": {}},
        "pools.gpu.dns": {"gpu": {"dns": "triton-gpu.models.svc"}},
    }
    for pools in ({"gpu": {"dns": "10.0.0.5:8001"}}, {"gpu": {"dns": "[::1]:8001"}}, {"gpu": {"dns": "a..b:8001"}}):
        with pytest.raises(ConfigError) as error:
            config_from_mapping({**base, "pools": pools})
        assert error.value.path == "pools.gpu.dns"
    for path, pools in cases.items():
        with pytest.raises(ConfigError) as error:
            config_from_mapping({**base, "pools": pools})
        assert error.value.path == path
    with pytest.raises(ConfigError) as error:
        config_from_mapping({**base, "pools": {"gpu": {"dns": "t:8001"}},
                             "upstream": {"discovery": {"nameservers": ["10.0.0.10:x"]}}})
    assert error.value.path == "upstream.discovery.nameservers[0]"
