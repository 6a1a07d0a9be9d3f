"""Real servers shared across the session: two Triton servers from the wheel and a gateway over them.

Tests that kill or restart a backend start their own servers (a local Triton starts in about a
second) so the shared ones stay healthy for everyone else.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from hypothesis import settings

# Hypothesis times each example (200 ms by default) and fails one that is slow once: on a busy
# 2-core CI machine the first call of a kernel can take longer. Correctness is what these tests
# check; speed is measured by the benchmarks.
settings.register_profile("tensorgate", deadline=None)
settings.load_profile("tensorgate")

from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import EnvoyGatewayThread, GatewayThread


def start_tritons(count: int, log_dir, prefix: str) -> list[LocalTriton]:
    servers = [LocalTriton(default_model_repository(), name=f"{prefix}-{i}", log_dir=log_dir) for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda server: server.start(), servers))
    return servers


@pytest.fixture(scope="session")
def tritons(tmp_path_factory):
    servers = start_tritons(2, tmp_path_factory.mktemp("triton-logs"), "shared")
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def triton(tritons) -> LocalTriton:
    """One Triton to compare the gateway's answers with."""
    return tritons[0]


def gateway_on(front_door: str, config: dict) -> GatewayThread:
    """A gateway handle (not started) on the given front door: "envoy", "grpcio-uvloop" or "grpcio-asyncio"."""
    if front_door == "envoy":
        return EnvoyGatewayThread(config)
    return GatewayThread(config, use_uvloop=front_door == "grpcio-uvloop")


@pytest.fixture(scope="session", params=["uvloop", "asyncio"])
def event_loop_kind(request) -> str:
    """The event loop a test's in-process gateway runs on: every test that takes this runs on
    uvloop, the default, and again on the stock asyncio loop, as uvloop's own suite does."""
    return request.param


@pytest.fixture(scope="session", params=["grpcio-uvloop", "grpcio-asyncio", "envoy"])
def front_door(request) -> str:
    """The engine (and loop) the shared gateway is served by: every test that takes `gateway` runs
    on the grpcio engine on uvloop and on the stock loop, and on the envoy engine."""
    return request.param


@pytest.fixture(scope="session")
def gateway(tritons, front_door):
    """The gateway over both shared Tritons: pool `primary` first, `secondary` as spill-over."""
    config = {
        "listen": "127.0.0.1:0",
        "pools": {
            "primary": {"backends": [tritons[0].grpc_address]},
            "secondary": {"backends": [tritons[1].grpc_address]},
        },
        "health": {"interval_s": 0.5},
        "server": {"reflection": True},  # off by default; tests/test_health_reflection.py drives it
    }
    with gateway_on(front_door, config) as thread:
        yield thread


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors(request):
    """Fail any test after which the shared gateway's event loop logged an unhandled exception."""
    yield
    if "gateway" in request.fixturenames:
        errors = request.getfixturevalue("gateway").take_loop_errors()
        assert not errors, f"unhandled exceptions in the gateway's event loop: {errors}"
