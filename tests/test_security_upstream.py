"""TLS toward the backends: a real Triton from the wheel serving gRPC over mutual TLS
(`--grpc-use-ssl`, `--grpc-use-ssl-mutual`), with certificates made here.

Triton's HTTP endpoint cannot serve TLS (it has no such option; TLS there is a proxy's job), so
the HTTP transport is tested through a TLS terminator in front of that endpoint (tests/servers.py
TlsRelay, Python's ssl), which requires the gateway's client certificate too. The upstream is the
same code on both engines (the stages run unchanged inside Envoy), so these run on grpc.aio.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.local.triton import LocalTriton
from gateway.testing import GatewayThread
from tests.pki import Pki
from tests.servers import TlsRelay
from tests.waiting import wait_until

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    maker = Pki(tmp_path_factory.mktemp("pki"))
    ca = maker.authority("backend-ca")
    other = maker.authority("some-other-ca")
    return SimpleNamespace(
        ca=ca, other=other,
        backend=maker.issue(ca, "triton", hosts=("127.0.0.1", "localhost")),
        gateway=maker.issue(ca, "gateway-client", client=True),
        stranger=maker.issue(other, "stranger", client=True),
    )


@pytest.fixture(scope="module")
def tls_triton(pki, tmp_path_factory):
    """A Triton whose gRPC endpoint takes only mutual TLS with a certificate of the backend CA,
    and a TLS relay (same requirement) in front of its plaintext HTTP endpoint."""
    folder = tmp_path_factory.mktemp("tls-triton")
    repository = folder / "models"
    shutil.copytree(MODELS / "simple_scale", repository / "simple_scale")
    server = LocalTriton(repository, name="tls", log_dir=folder, extra_args=[
        "--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={pki.backend.cert}", f"--grpc-server-key={pki.backend.key}",
        f"--grpc-root-cert={pki.ca.cert}",
    ])
    server.start()
    relay = TlsRelay(server.http_address, pki.backend.cert, pki.backend.key, client_ca_file=pki.ca.cert)
    yield SimpleNamespace(server=server, relay=relay)
    relay.close()
    server.stop()


def _config(tls_triton, transport: str, tls: dict | None) -> dict:
    pool = {"backends": [tls_triton.server.grpc_address]}
    if transport == "http":
        pool["http_backends"] = [tls_triton.relay.address]
    config = {"listen": "127.0.0.1:0", "pools": {"tls": pool}, "health": {"interval_s": 0.3},
              "upstream": {"transport": transport}}
    if tls is not None:
        config["upstream"]["tls"] = tls
    return config


def _infer(address: str):
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), 3.0, np.float32))
    return client.infer("simple_scale", [tensor], client_timeout=20)


def _wait_health(gateway: GatewayThread, want: str, timeout: float = 30.0) -> dict:
    """The only backend's snapshot once its health is `want`."""
    def only_backend() -> dict:
        (backend,) = gateway.snapshot()["backends"].values()
        return backend

    return wait_until(only_backend, f"the backend to be {want}", timeout, step=0.1,
                      accept=lambda backend: backend["health"] == want)


@pytest.mark.parametrize("transport", ["grpc-stream", "http"])
def test_requests_reach_a_backend_over_mutual_tls(tls_triton, pki, transport):
    tls = {"ca_file": str(pki.ca.cert), "cert_file": str(pki.gateway.cert), "key_file": str(pki.gateway.key)}
    with GatewayThread(_config(tls_triton, transport, tls)) as gateway:
        _wait_health(gateway, "healthy")
        relayed = tls_triton.relay.connections
        for _ in range(5):
            result = _infer(gateway.address)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 6.0, np.float32))
        backend = gateway.call(lambda: gateway.gateway.fleet.backends()[0])
        if transport == "http":
            # the answers came over HTTP, through the TLS relay (its only way to Triton's HTTP port)
            assert gateway.call(lambda: backend.rest.pool.requests) >= 5
            assert tls_triton.relay.connections >= max(1, relayed)
        assert gateway.call(lambda: backend.served) >= 5
        assert not gateway.take_loop_errors()


@pytest.mark.parametrize("case", ["plaintext", "backend of another CA", "no client certificate",
                                  "client certificate of another CA"])
def test_a_backend_that_fails_tls_verification_is_never_used(tls_triton, pki, case):
    """Every failure shows in the gRPC health checks, which both transports run first."""
    tls = {
        "plaintext": None,
        "backend of another CA": {"ca_file": str(pki.other.cert), "cert_file": str(pki.gateway.cert),
                                  "key_file": str(pki.gateway.key)},
        "no client certificate": {"ca_file": str(pki.ca.cert)},
        "client certificate of another CA": {"ca_file": str(pki.ca.cert), "cert_file": str(pki.stranger.cert),
                                             "key_file": str(pki.stranger.key)},
    }[case]
    with GatewayThread(_config(tls_triton, "grpc-stream", tls)) as gateway:
        backend = _wait_health(gateway, "unhealthy")
        assert "health check failed" in backend["detail"]
        with pytest.raises(triton_grpc.InferenceServerException) as error:
            _infer(gateway.address)
        assert error.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"), error.value
