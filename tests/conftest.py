"""Real servers shared across the session: two Triton servers from the wheel and a gateway over them.

Tests that kill or restart a backend start their own servers (a local Triton starts in about a
second) so the shared ones stay healthy for everyone else.

A shared Triton that dies on its own is a fault of Triton, not of the test that was running. The
Triton in the wheel (2.51) aborts when one ModelStreamInfer stream carries a decoupled model's
requests beside others ("proto_buffer_writer.h ASSERTION FAILED: !byte_buffer->Valid()", or a heap
it corrupted found later at a thread's exit: "unaligned tcache chunk detected"); the gateway keeps
decoupled requests on an upstream stream of their own since (gateway/upstream/backend.py), which
ended the aborts its own traffic caused. It also has races on request cancellation
(triton-inference-server/server#7368, #8034; fixed in later releases, which no wheel carries), and
a test may send such a stream to a Triton directly. So that one such abort does not fail every test
after it, `pytest_runtest_protocol` below restarts a shared Triton found dead (same ports) and runs
the test it died under once more; every such death is printed at the end of the run with the tail
of Triton's log. Nothing else is retried.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from _pytest.runner import runtestprotocol
from hypothesis import settings

# Hypothesis times each example (200 ms by default) and fails one that is slow once: on a busy
# 2-core CI machine the first call of a kernel can take longer. Correctness is what these tests
# check; speed is measured by the benchmarks.
settings.register_profile("tensorgate", deadline=None)
settings.load_profile("tensorgate")

from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import EnvoyGatewayThread, GatewayThread


def start_tritons(count: int, log_dir, prefix: str) -> list[LocalTriton]:
    """Started Tritons over the example models. Each reads its own `slow_on_demand` delay from the
    file its TENSORGATE_DELAY_FILE names (absent: no delay), which a test may write and remove."""
    servers = [
        LocalTriton(default_model_repository(), name=f"{prefix}-{i}", log_dir=log_dir,
                    env={"TENSORGATE_DELAY_FILE": str(log_dir / f"{prefix}-{i}-delay-ms")})
        for i in range(count)
    ]
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda server: server.start(), servers))
    return servers


_SHARED_TRITONS: list[LocalTriton] = []  # the session's shared servers, while they are up
_TRITON_DEATHS: list[str] = []  # what the terminal summary reports
_READMIT_WAIT_S = 5.0  # a restarted backend is healthy again for the gateways after one health check (≤ 1 s)


@pytest.fixture(scope="session")
def tritons(tmp_path_factory):
    servers = start_tritons(2, tmp_path_factory.mktemp("triton-logs"), "shared")
    _SHARED_TRITONS[:] = servers
    yield servers
    _SHARED_TRITONS.clear()
    for server in servers:
        server.stop()


def _revive_dead_tritons(when: str) -> bool:
    """Restart every shared Triton that exited on its own; True if one had."""
    dead = [server for server in _SHARED_TRITONS if not server.is_running]
    for server in dead:
        _TRITON_DEATHS.append(f"{server!r} was found dead {when}; its log ended:\n{server.log_tail()}")
        server.restart()
    if dead:
        time.sleep(_READMIT_WAIT_S)
    return bool(dead)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a test that uses the shared Tritons; once more if one of them died while it ran."""
    if "tritons" not in item.fixturenames:
        return None
    _revive_dead_tritons(f"before {item.nodeid}")
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(report.failed for report in reports) and _revive_dead_tritons(f"after {item.nodeid} failed"):
        failure = next(report for report in reports if report.failed)
        _TRITON_DEATHS.append(f"{item.nodeid} is run again; its first run failed with:\n"
                              f"{failure.longreprtext[-2000:]}")
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter):
    if _TRITON_DEATHS:
        terminalreporter.section("shared Tritons that died on their own (restarted)")
        for line in _TRITON_DEATHS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def triton(tritons) -> LocalTriton:
    """One Triton to compare the gateway's answers with."""
    return tritons[0]


def gateway_on(front_door: str, config: dict) -> GatewayThread:
    """A gateway handle (not started) on the given front door: "envoy", "h2", "grpcio-uvloop" or
    "grpcio-asyncio"."""
    if front_door == "envoy":
        return EnvoyGatewayThread(config)
    engine = "h2" if front_door == "h2" else "grpcio"
    config = {**config, "server": {**(config.get("server") or {}), "engine": engine}}
    return GatewayThread(config, use_uvloop=front_door != "grpcio-asyncio")


@pytest.fixture(scope="session", params=["uvloop", "asyncio"])
def event_loop_kind(request) -> str:
    """The event loop a test's in-process gateway runs on: every test that takes this runs on
    uvloop, the default, and again on the stock asyncio loop, as uvloop's own suite does."""
    return request.param


@pytest.fixture(scope="session", params=["grpcio-uvloop", "grpcio-asyncio", "envoy", "h2"])
def front_door(request) -> str:
    """The engine (and loop) the shared gateway is served by: every test that takes `gateway` runs
    on the grpcio engine on uvloop and on the stock loop, on the envoy engine, and on the h2 engine."""
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
