"""SIGTERM drains: `tensorgate serve` as a real process under load, on both engines.

A rolling deploy or a pod eviction sends SIGTERM with requests in flight. The gateway must go
NOT_SERVING first (grpc.health.v1 Watch and Check, Triton's ServerReady), finish what is in flight
within `server.grace_s`, and only then exit — never answer a request CANCELLED, a status clients
do not retry. Before the drain, grpc.aio's shutdown cancelled what grpc core had not yet handed
to the gateway (174–204 of 300 in the probe of issue 13), and exited after 0.2 s.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.bench.loadgen import MODEL_INFER_METHOD, build_infer_request
from gateway.local.triton import find_free_port
from gateway.protocol import pb
from tests.waiting import wait_until_async

TENSORGATE = [sys.executable, "-m", "gateway"]
IN_FLIGHT = 300
GRACE_S = 10.0
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"


def serve(tmp_path, triton, engine: str) -> tuple[subprocess.Popen, str]:
    port = find_free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "pools": {"p": {"backends": [triton.grpc_address]}},
        "server": {"engine": engine, "grace_s": GRACE_S},
        # fixed_cost sleeps 2 ms per execute; unbatched, 300 requests keep Triton busy ~0.6 s or more.
        "batching": {"models": {"fixed_cost": {"enabled": False}}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([*TENSORGATE, "serve", "--config", str(path)], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "serving on" in line, line
    return process, f"127.0.0.1:{port}"


async def drain_under_load(process: subprocess.Popen, address: str) -> dict:
    payload = build_infer_request("fixed_cost")
    outcome: dict = {"in_flight": collections.Counter(), "after": collections.Counter(), "health": []}
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(MODEL_INFER_METHOD)
        await call(payload, timeout=30)  # warm: the model resolved, connections open
        ready = channel.unary_unary(SERVER_READY, response_deserializer=pb.ServerReadyResponse.FromString)
        assert (await ready(pb.ServerReadyRequest().SerializeToString(), timeout=10)).ready
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        statuses = outcome["health"]
        first = await watch.read()
        statuses.append(first.status)

        async def watching() -> None:
            try:
                while (answer := await watch.read()) is not grpc.aio.EOF:
                    statuses.append(answer.status)
            except grpc.aio.AioRpcError:
                pass

        watcher = asyncio.ensure_future(watching())

        async def one(into: collections.Counter) -> None:
            try:
                await call(payload, timeout=60)
                into["OK"] += 1
            except grpc.aio.AioRpcError as error:
                into[error.code().name] += 1

        flight = [asyncio.ensure_future(one(outcome["in_flight"])) for _ in range(IN_FLIGHT)]
        await asyncio.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        async def steady() -> None:
            # A client that keeps sending after the SIGTERM, one request after another, until the
            # gateway refuses it: then it goes to another replica, as a client told UNAVAILABLE does.
            while process.poll() is None and not outcome["after"]["UNAVAILABLE"]:
                await one(outcome["after"])

        steadies = [asyncio.ensure_future(steady()) for _ in range(4)]
        await asyncio.gather(*flight)
        outcome["in_flight_done_s"] = time.monotonic() - signalled
        await wait_until_async(lambda: process.poll() is not None, "the gateway to exit",
                               signalled + GRACE_S + 30 - time.monotonic(), step=0.02, raise_on_timeout=False)
        outcome["exit_s"] = time.monotonic() - signalled
        await asyncio.gather(*steadies)
        watcher.cancel()
    return outcome


@pytest.mark.parametrize("engine", ["grpcio", "envoy", "h2"])
def test_sigterm_under_load_drops_no_request(tmp_path, triton, engine):
    process, address = serve(tmp_path, triton, engine)
    try:
        outcome = asyncio.run(drain_under_load(process, address))
    finally:
        if process.poll() is None:
            process.kill()
    assert process.wait(timeout=30) == 0
    assert outcome["in_flight"] == {"OK": IN_FLIGHT}, outcome
    # Sent after the SIGTERM: served, or refused as UNAVAILABLE (retryable) — never CANCELLED or INTERNAL.
    assert set(outcome["after"]) <= {"OK", "UNAVAILABLE"}, outcome
    assert outcome["after"]["OK"] > 0, outcome  # served while load balancers catch up
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert outcome["health"][:2] == [SERVING, NOT_SERVING], outcome  # probes were told before the exit
    assert outcome["exit_s"] < GRACE_S + 10, outcome


def test_a_stage_that_never_stops_does_not_hold_up_the_gateways_stop(triton, monkeypatch, caplog):
    """Stopping waits for each stage at most STAGE_STOP_S: one whose close never returns is named
    in a warning and left behind, and the others are still stopped (the backends' channels too)."""
    from gateway import app
    from gateway.testing import GatewayThread

    monkeypatch.setattr(app, "STAGE_STOP_S", 0.5)
    config = {"listen": "127.0.0.1:0", "pools": {"main": {"backends": [triton.grpc_address]}}}
    gateway = GatewayThread(config).start()
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    gateway.gateway.traffic.close = hangs
    fleet_closed = []
    real_fleet_close = gateway.gateway.fleet.close

    async def fleet_close() -> None:
        await real_fleet_close()
        fleet_closed.append(True)

    gateway.gateway.fleet.close = fleet_close
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="gateway.app"):
        gateway.stop()
    took = time.monotonic() - started
    assert took < 10, f"stop took {took:.1f} s"
    assert fleet_closed == [True]  # the stages after the stuck one were stopped all the same
    assert "stopping traffic took more than 0.5 s" in caplog.text, caplog.text
