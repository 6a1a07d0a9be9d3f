"""Config reload without dropping a request: through the admin API (both engines), on SIGHUP and on
a changed config file (`tensorgate serve` as a real process, both engines). A config the loader
refuses is refused — INVALID_ARGUMENT with the loader's message over the admin API, a log line
otherwise — and the running config keeps serving. Keys that need a restart keep their value.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import grpc
import pytest
import yaml

from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import ReloadConfigRequest, ReloadConfigResponse, Snapshot, SnapshotRequest
from gateway.local.triton import find_free_port
from tests.conftest import gateway_on
from tests.servers import SteadyLoad
from tests.waiting import wait_until

TENSORGATE = [sys.executable, "-m", "gateway"]


def admin(address: str):
    channel = grpc.insecure_channel(address)
    snapshot = channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot", request_serializer=SnapshotRequest.SerializeToString,
                                   response_deserializer=Snapshot.FromString)
    reload = channel.unary_unary(f"/{GATEWAY_SERVICE}/ReloadConfig",
                                 request_serializer=ReloadConfigRequest.SerializeToString,
                                 response_deserializer=ReloadConfigResponse.FromString)
    return channel, (lambda: json.loads(snapshot(SnapshotRequest(), timeout=10).json)), reload


def config_on(backend: str, **extra) -> dict:
    return {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [backend]}}, **extra}


@pytest.mark.parametrize("engine", ["grpcio-uvloop", "envoy", "h2"])
def test_reload_through_the_admin_api_under_load(tritons, engine):
    first, second = tritons[0].grpc_address, tritons[1].grpc_address
    with gateway_on(engine, config_on(first)) as gateway, SteadyLoad(gateway.address) as load:
        channel, snapshot, reload = admin(gateway.address)
        with channel:
            load.served_more_than(50)
            before = snapshot()
            assert set(before["backends"]) == {first}
            assert before["batching"]["simple_scale:1"]["mode"] == "adaptive"

            # Another backend and another batching mode, applied live.
            new = config_on(second, batching={"models": {"simple_scale": {"mode": "fixed", "max_queue_delay_us": 200}}})
            answer = reload(ReloadConfigRequest(config_yaml=yaml.safe_dump(new)), timeout=60)
            assert "pools" in answer.message and "batching" in answer.message
            served = load.outcome["OK"]
            load.served_more_than(served + 100)
            after = snapshot()
            assert set(after["backends"]) == {second}  # the new setting is in effect...
            assert after["backends"][second]["served"] > 0  # ...and serves the traffic
            assert after["batching"]["simple_scale:1"]["mode"] == "fixed"
            assert after["serving"]["reloads"] == 1

            # A config the loader refuses: INVALID_ARGUMENT with its message; the running one serves on.
            with pytest.raises(grpc.RpcError) as error:
                reload(ReloadConfigRequest(config_yaml="listen: 127.0.0.1:0\npools: {p: {backends: [nohost]}}\n"),
                       timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "pools.p.backends[0]: expected host:port, got 'nohost'" in error.value.details()
            assert "running config keeps serving" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:
                reload(ReloadConfigRequest(config_yaml="listen: [unclosed\n"), timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid YAML" in error.value.details()
            served = load.outcome["OK"]
            load.served_more_than(served + 50)
            assert set(snapshot()["backends"]) == {second}

            # Restart-only keys keep their running value, and the answer says so.
            moved = dict(new, listen="127.0.0.1:1", server={"max_message_bytes": 2048})
            answer = reload(ReloadConfigRequest(config_yaml=yaml.safe_dump(moved)), timeout=60)
            assert "kept until a restart: listen, server.max_message_bytes" in answer.message
            load.served_more_than(load.outcome["OK"] + 50)
    assert set(load.outcome) == {"OK"}, (load.outcome, load.samples)  # not one request dropped


def serve_process(tmp_path, config: dict, engine: str) -> tuple[subprocess.Popen, str, object]:
    port = find_free_port()
    path = tmp_path / "gateway.yaml"

    def write(mapping: dict) -> None:
        mapping = {**mapping, "listen": f"127.0.0.1:{port}"}
        mapping["server"] = {"engine": engine, **mapping.get("server", {})}
        text = yaml.safe_dump(mapping)
        partial = path.with_suffix(".tmp")  # as editors and ConfigMap updates do: replace, never half-written
        partial.write_text(text)
        partial.replace(path)

    write(config)
    process = subprocess.Popen([*TENSORGATE, "serve", "--config", str(path)], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "serving on" in line, line
    return process, f"127.0.0.1:{port}", write


@pytest.mark.parametrize("engine", ["grpcio", "envoy", "h2"])
def test_sighup_and_a_changed_file_reload_under_load(tmp_path, tritons, engine):
    first, second = tritons[0].grpc_address, tritons[1].grpc_address
    # Not watched at first (config_poll_s: 0): only SIGHUP reloads.
    process, address, write = serve_process(tmp_path, config_on(first, server={"config_poll_s": 0}), engine)
    try:
        channel, snapshot, _ = admin(address)
        with channel, SteadyLoad(address) as load:
            load.served_more_than(50)
            assert set(snapshot()["backends"]) == {first}

            write(config_on(second, server={"config_poll_s": 0.2}))
            time.sleep(1.5)
            assert set(snapshot()["backends"]) == {first}, "reloaded without being asked"
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: set(snapshot()["backends"]) == {second}, "SIGHUP to reload")
            assert process.poll() is None, "SIGHUP ended the gateway"

            write(config_on(first, server={"config_poll_s": 0.2}))  # now watched: the change alone reloads
            wait_until(lambda: set(snapshot()["backends"]) == {first}, "the changed file to be reloaded")
            served = load.outcome["OK"]
            load.served_more_than(served + 50)

            write({"listen": "x", "pools": {"p": {"backends": ["nohost"]}}})  # refused: logged, old config serves on
            process.send_signal(signal.SIGHUP)
            time.sleep(1.5)
            assert set(snapshot()["backends"]) == {first}
            served = load.outcome["OK"]
            load.served_more_than(served + 50)
        assert set(load.outcome) == {"OK"}, (load.outcome, load.samples)
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
