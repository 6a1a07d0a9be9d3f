"""A Triton on the gateway's own node, its HTTP endpoint on a Unix socket (`http_backends: unix:/…`).

A real Triton from the wheel serves HTTP on a Unix socket (`--http-address=unix:PATH`) and gRPC on
TCP; the gateway's inference requests ride the socket, its health checks and metadata gRPC. Stock
clients get what Triton itself answers; a socket that is not there makes the backend unhealthy
with a detail naming it; the config refuses what cannot work, saying what it expected.
"""

from __future__ import annotations

import pytest
import tritonclient.grpc as triton_grpc

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import GatewayThread
from tests.pki import Pki
from tests.test_conformance import assert_same_result, make_inputs
from tests.waiting import wait_until


def _config(triton: LocalTriton, http_address: str) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"local": {"backends": [triton.grpc_address], "http_backends": [http_address]}},
        "upstream": {"transport": "http"},
        "health": {"interval_s": 0.5},
        "batching": {"default": {"enabled": False}},
    }


@pytest.fixture(scope="module")
def socket_triton(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uds")
    server = LocalTriton(default_model_repository(), name="uds", log_dir=directory,
                         http_unix_socket=directory / "http.sock")
    server.start()
    yield server
    server.stop()


def test_requests_ride_the_unix_socket_and_answer_as_triton(socket_triton):
    assert socket_triton.http_address.startswith("unix:/")
    with GatewayThread(_config(socket_triton, socket_triton.http_address)) as gateway:
        direct = triton_grpc.InferenceServerClient(socket_triton.grpc_address)
        through = triton_grpc.InferenceServerClient(gateway.address)
        for model in ("simple_scale", "add_sub", "bytes_reverse", "dtypes"):
            inputs = make_inputs(model)
            assert_same_result(direct.infer(model, inputs, request_id=f"{model}-1"),
                               through.infer(model, inputs, request_id=f"{model}-1"))
        pools = gateway.call(lambda: [b.rest.pool for b in gateway.gateway.fleet.backends()])
        assert [pool.address for pool in pools] == [socket_triton.http_address]
        assert pools[0].requests >= 4 and pools[0].connects >= 1, pools[0]


def test_a_missing_socket_makes_the_backend_unhealthy_and_says_which(socket_triton, tmp_path):
    missing = f"unix:{tmp_path / 'nothing-here.sock'}"
    with GatewayThread(_config(socket_triton, missing)) as gateway:
        backend = wait_until(lambda: gateway.snapshot()["backends"][socket_triton.grpc_address],
                             "the backend to be unhealthy", 10, step=0.1,
                             accept=lambda backend: backend["health"] == "unhealthy")
        assert missing in backend["detail"], backend


@pytest.mark.parametrize("address, expected", [
    ("unix:relative/http.sock", "expected unix:/absolute/path/to/socket"),
    ("unix:/" + "d" * 120, "a Unix socket path is at most 107 bytes"),
    ("/var/run/triton.sock", "expected host:port"),
])
def test_bad_socket_addresses_are_refused_naming_the_key(address, expected):
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"local": {"backends": ["127.0.0.1:8001"], "http_backends": [address]}}})
    assert "pools.local.http_backends[0]" in str(error.value)
    assert expected in str(error.value)


def test_upstream_tls_to_a_unix_socket_is_refused(tmp_path):
    ca = Pki(tmp_path).authority("backend-ca")
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"listen": "127.0.0.1:0",
                             "pools": {"local": {"backends": ["127.0.0.1:8001"], "http_backends": ["unix:/run/t.sock"]}},
                             "upstream": {"tls": {"ca_file": str(ca.cert)}}})
    assert "pools.local.http_backends[0]" in str(error.value)
    assert "does not leave the node" in str(error.value)
