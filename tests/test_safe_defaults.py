"""What the gateway exposes when the config does not say: the Prometheus endpoint on the loopback
address only, and no server reflection (both documented in their config dataclasses)."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import config_from_mapping
from gateway.testing import GatewayThread
from tests.conftest import gateway_on


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses with a socket listening on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                              else address)
    return found


def test_defaults_in_the_config():
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}}})
    assert config.telemetry.prometheus_host == "127.0.0.1"
    assert config.server.reflection is False


def test_metrics_endpoint_binds_loopback_by_default(tritons):
    config = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [tritons[0].grpc_address]}},
              "telemetry": {"prometheus_port": 0}}
    with GatewayThread(config) as thread:
        port = thread.gateway.telemetry.prometheus_port
        assert listening_addresses(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200


@pytest.mark.parametrize("engine", ["grpcio-uvloop", "envoy", "h2"])
def test_reflection_is_off_unless_configured(tritons, engine):
    config = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [tritons[0].grpc_address]}}}
    with gateway_on(engine, config) as gateway, grpc.insecure_channel(gateway.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            list(answers)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
