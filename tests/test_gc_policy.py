"""The serving process's garbage collector (gateway/server/gc_policy.py): `tensorgate serve` on both
engines freezes what start-up built and raises the young threshold (read back through the admin
GetSnapshot of the real process), as configured; a gateway embedded in a program leaves that
program's collector alone."""

from __future__ import annotations

import gc

import pytest

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.testing import GatewayThread
from tests.test_reload import admin, serve_process


@pytest.mark.parametrize("engine", ["grpcio", "envoy", "h2"])
@pytest.mark.parametrize("server, threshold, frozen", [({}, 700, True), ({"gc_threshold": 5000, "gc_freeze": False}, 5000, False)])
def test_serve_applies_the_collector_policy(tmp_path, tritons, engine, server, threshold, frozen):
    config = {"pools": {"p": {"backends": [tritons[0].grpc_address]}}, "server": server}
    process, address, _ = serve_process(tmp_path, config, engine)
    try:
        channel, snapshot, _ = admin(address)
        with channel:
            state = snapshot()["serving"]["gc"]
        assert state["threshold"][0] == threshold
        # Start-up built hundreds of thousands of objects (numpy, numba, protobuf, the stages).
        assert (state["frozen"] > 10_000) if frozen else state["frozen"] == 0
    finally:
        process.terminate()
        process.wait(30)


def test_an_embedded_gateway_leaves_the_programs_collector_alone(tritons):
    before = gc.get_threshold(), gc.get_freeze_count()
    with GatewayThread({"listen": "127.0.0.1:0", "pools": {"p": {"backends": [tritons[0].grpc_address]}}}) as thread:
        assert thread.snapshot()["serving"]["gc"]["threshold"] == list(before[0])
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


@pytest.mark.parametrize("value", [0, 99, "many", True])
def test_a_threshold_that_would_stop_or_thrash_the_collector_is_refused(value):
    with pytest.raises(ConfigError, match="server.gc_threshold"):
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}},
                             "server": {"gc_threshold": value}})
