"""Real servers shared across the session: two Triton servers from the wheel and a gateway over them.

Tests that kill or restart a backend start their own servers (a local Triton starts in about a
second) so the shared ones stay healthy for everyone else.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import GatewayThread


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


@pytest.fixture(scope="session", params=["uvloop", "asyncio"])
def event_loop_kind(request) -> str:
    """The event loop a test's gateway runs on: every test that takes this (or the shared `gateway`)
    runs on uvloop, the default, and again on the stock asyncio loop, as uvloop's own suite does."""
    return request.param


@pytest.fixture(scope="session")
def gateway(tritons, event_loop_kind):
    """The gateway over both shared Tritons: pool `primary` first, `secondary` as spill-over."""
    config = {
        "listen": "127.0.0.1:0",
        "pools": {
            "primary": {"backends": [tritons[0].grpc_address]},
            "secondary": {"backends": [tritons[1].grpc_address]},
        },
        "health": {"interval_s": 0.5},
    }
    with GatewayThread(config, use_uvloop=event_loop_kind == "uvloop") as thread:
        yield thread


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors(request):
    """Fail any test after which the shared gateway's event loop logged an unhandled exception."""
    yield
    if "gateway" in request.fixturenames:
        thread = request.getfixturevalue("gateway")
        errors, thread.loop_errors[:] = list(thread.loop_errors), []
        assert not errors, f"unhandled exceptions in the gateway's event loop: {errors}"
