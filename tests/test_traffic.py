"""Versions and traffic through the real gateway, with real Tritons and stock clients: a weighted
split between versions (observed shares within binomial bounds), a sticky key (header or
parameter) that keeps a client on one version, and a shadow version that gets copies of live
traffic — its errors never reach a client, its drops are counted, and its outputs are compared
with the live version's.

`versioned_scale` answers OUTPUT0 = INPUT0 × version for versions 1 and 2, so each answer says
which version served it; version 3 fails every request (a broken candidate).
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.routing.config import ShadowConfig
from gateway.testing import GatewayThread
from tests.conftest import gateway_on
from tests.servers import sample, scrape
from tests.waiting import wait_until

MODEL = "versioned_scale"
STICKY = "tensorgate-sticky-key"


def _config(tritons, **route) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"a": {"backends": [tritons[0].grpc_address]}, "b": {"backends": [tritons[1].grpc_address]}},
        "models": {MODEL: {"pools": ["a", "b"], **route}},
        "health": {"interval_s": 0.5},
    }


def _version_of(result) -> str:
    """Which version answered: OUTPUT0 / INPUT0 (the inputs are never 0)."""
    return result.get_response().model_version


def _send(address: str, count: int, headers=None, parameters=None, values=None) -> list:
    client = triton_grpc.InferenceServerClient(address)
    try:
        results = []
        for i in range(count):
            x = np.full((1, 16), 1.0 + i % 7, np.float32) if values is None else values[i].reshape(1, 16)
            tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(MODEL, [tensor], headers=headers, parameters=parameters, client_timeout=30)
            ratio = float(result.as_numpy("OUTPUT0")[0, 0] / x[0, 0])
            assert str(round(ratio)) == _version_of(result), (ratio, _version_of(result))
            results.append(result)
        return results
    finally:
        client.close()


def test_split_shares_within_binomial_bounds_and_a_failing_shadow_never_reaches_clients(tritons):
    requests, threads, canary = 1600, 8, 0.2
    route = {"split": {"1": 80, "2": 20}, "shadow": {"version": "3", "max_in_flight": 2}}
    config = {**_config(tritons, **route), "telemetry": {"prometheus_port": 0, "prometheus_host": "127.0.0.1"}}
    with GatewayThread(config) as gateway:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            batches = list(pool.map(lambda _: _send(gateway.address, requests // threads), range(threads)))
        versions = [_version_of(result) for batch in batches for result in batch]  # every request answered
        assert len(versions) == requests
        on_canary = versions.count("2")
        sigma = math.sqrt(requests * canary * (1 - canary))
        assert abs(on_canary - requests * canary) <= 4 * sigma, (on_canary, requests * canary, sigma)
        assert versions.count("1") == requests - on_canary

        wait_until(lambda: gateway.snapshot()["traffic"][MODEL]["shadow"]["in_flight"] == 0, "the shadow's copies to finish")
        snapshot = gateway.snapshot()
        traffic = snapshot["traffic"][MODEL]
        assert traffic["split"]["picked"] == {"1": requests - on_canary, "2": on_canary}
        assert traffic["split"]["stable"] == "1" and traffic["split"]["canaries"] == ["2"]
        live = traffic["versions"]
        assert (live["1"]["requests"], live["2"]["requests"]) == (requests - on_canary, on_canary)
        assert live["1"]["errors"] == live["2"]["errors"] == 0
        assert live["1"]["latency"]["count"] == requests - on_canary and live["1"]["latency"]["p99_ms"] > 0

        # Each version's outputs, on edges learned from the stable version's, compared with them.
        outputs = traffic["outputs"]
        assert outputs["reference"] == "1" and not outputs["learning"], outputs
        assert sum(outputs["counts"]["1"]) == (requests - on_canary) * 16
        assert sum(outputs["counts"]["2"]) == on_canary * 16
        assert outputs["compared"]["2"]["ks"] > 0.3, outputs["compared"]  # version 2 doubles every value

        shadow = traffic["shadow"]
        # Every live request was copied, or its copy was dropped because 2 were already out; none lost.
        assert shadow["sent"] + shadow["dropped"] + shadow["unplaced"] == requests, shadow
        assert shadow["sent"] > 0 and shadow["dropped"] > 0, shadow
        # The broken version failed every copy it got; no client saw any of it.
        assert shadow["requests"] == shadow["sent"] and shadow["errors"] == shadow["sent"], shadow
        assert shadow["statuses"] == {"INTERNAL": shadow["sent"]}, shadow["statuses"]

        # Backend picks by reason (batching merges requests of one version: picks <= requests).
        routing = snapshot["routing"]
        assert 0 < routing["a/preferred"] <= requests - on_canary and 0 < routing["a/canary"] <= on_canary, routing
        assert routing["a/shadow"] == shadow["sent"], routing

        # The shadow's copies reach the metrics by outcome.
        metrics = scrape(gateway.gateway.telemetry.prometheus_port)
        for outcome in ("sent", "dropped", "failed", "unplaced"):
            assert sample(metrics, "tensorgate_shadow_copies_total", model=MODEL, outcome=outcome) == shadow[outcome]
        assert not gateway.loop_errors


def test_sticky_key_keeps_a_client_on_one_version(tritons, front_door):
    """Through every front door (the header is gRPC metadata the engine hands over)."""
    with gateway_on(front_door, _config(tritons, split={"1": 50, "2": 50})) as gateway:
        seen = {}
        for user in range(24):
            key = f"user-{user}"
            by_header = {_version_of(r) for r in _send(gateway.address, 8, headers={STICKY: key})}
            by_parameter = {_version_of(r) for r in _send(gateway.address, 8, parameters={STICKY: key})}
            assert len(by_header) == 1 and by_header == by_parameter, (key, by_header, by_parameter)
            seen[key] = by_header.pop()
        # The keys spread over both versions (a 50/50 split: all 24 on one side has odds 2^-23).
        assert set(seen.values()) == {"1", "2"}, seen
        # Without a key, each request is drawn anew: both versions answer.
        assert {_version_of(r) for r in _send(gateway.address, 40)} == {"1", "2"}
        # A request naming its version gets it, key or not.
        client = triton_grpc.InferenceServerClient(gateway.address)
        tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        for version in ("1", "2"):
            result = client.infer(MODEL, [tensor], model_version=version, headers={STICKY: "user-0"})
            assert result.get_response().model_version == version
        client.close()


@pytest.mark.parametrize("shadow_version, differs", [("2", True), ("1", False)])
def test_shadow_outputs_are_compared_with_the_live_versions(tritons, shadow_version, differs):
    """The live version is 1; a shadow of version 2 (outputs twice as large) shows in PSI and KS, a
    shadow of version 1 itself does not."""
    with GatewayThread(_config(tritons, split={"1": 1})) as gateway:
        traffic = gateway.gateway.traffic
        gateway.call(traffic.set_shadow, MODEL, ShadowConfig(version=shadow_version, max_in_flight=64, learn_values=800))
        values = np.random.default_rng(3).normal(5.0, 1.0, (400, 16)).astype(np.float32)
        _send(gateway.address, 400, values=values)
        wait_until(lambda: gateway.snapshot()["traffic"][MODEL]["shadow"]["in_flight"] == 0, "the shadow's copies to finish")
        shadow = gateway.snapshot()["traffic"][MODEL]["shadow"]
        assert shadow["errors"] == 0 and shadow["sent"] + shadow["dropped"] == 400, shadow
        outputs = shadow["outputs"]
        assert not outputs["learning"], outputs
        assert sum(outputs["counts"]["live"]) == 400 * 16
        assert sum(outputs["counts"]["shadow"]) == shadow["sent"] * 16
        compared = outputs["compared"]["shadow"]
        if differs:
            assert compared["psi"] > 1.0 and compared["ks"] > 0.5, outputs
        else:
            assert compared["psi"] < 0.05 and compared["ks"] < 0.05, outputs
        assert shadow["latency"]["count"] == shadow["sent"]

        # The rollout API: the shadow goes, its copies stop.
        gateway.call(traffic.clear_shadow, MODEL)
        _send(gateway.address, 10)
        assert gateway.snapshot()["traffic"][MODEL]["shadow"] is None
        assert not gateway.loop_errors


def _set_traffic(address: str, **fields) -> dict | None:
    import json

    import grpc

    from gateway.admin.gateway_service import SERVICE, SetTrafficRequest, Snapshot

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/SetTraffic", request_serializer=SetTrafficRequest.SerializeToString,
                                   response_deserializer=Snapshot.FromString)
        return json.loads(call(SetTrafficRequest(model=MODEL, **fields), timeout=10).json)


def test_admin_set_traffic_drives_split_and_shadow_on_every_front_door(tritons, front_door):
    """What `tensorgate rollout` will do from another process: the stages may live inside Envoy."""
    import json

    import grpc

    with gateway_on(front_door, _config(tritons, split={"1": 1})) as gateway:
        assert {_version_of(r) for r in _send(gateway.address, 10)} == {"1"}
        state = _set_traffic(gateway.address, split={"1": 0, "2": 1}, shadow_json=json.dumps({"version": "3"}))
        assert state["split"]["weights"] == {"1": 0.0, "2": 1.0} and state["shadow"]["version"] == "3"
        assert {_version_of(r) for r in _send(gateway.address, 20)} == {"2"}
        wait_until(lambda: gateway.snapshot()["traffic"][MODEL]["shadow"]["requests"] >= 1, "a shadow answer")
        # Invalid changes are refused whole, naming what was wrong; the split in force stays.
        for fields, words in (({"split": {"1": -1.0}}, "expected a weight >= 0"),
                              ({"shadow_json": json.dumps({"pool": "nowhere"})}, "unknown pool 'nowhere'"),
                              ({"shadow_json": "{", "split": {"1": 1.0}}, "expected a JSON object")):
            with pytest.raises(grpc.RpcError) as refused:
                _set_traffic(gateway.address, **fields)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
        assert gateway.snapshot()["traffic"][MODEL]["split"]["weights"] == {"1": 0.0, "2": 1.0}
        state = _set_traffic(gateway.address, clear_split=True, clear_shadow=True)
        assert state["split"] is None and state["shadow"] is None
        # No split: a request naming no version gets Triton's default (the latest, 3: broken).
        with pytest.raises(Exception, match="broken on purpose"):
            _send(gateway.address, 1)


def test_split_and_sticky_key_apply_to_streams(tritons):
    """ModelStreamInfer: the stream's metadata carries the key for each of its requests."""
    import queue

    with GatewayThread(_config(tritons, split={"1": 50, "2": 50})) as gateway:
        for user in ("user-1", "user-2", "user-3", "user-4"):
            answers: queue.Queue = queue.Queue()
            client = triton_grpc.InferenceServerClient(gateway.address)
            client.start_stream(callback=lambda result, error: answers.put((result, error)), headers={STICKY: user})
            tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            for i in range(10):
                client.async_stream_infer(MODEL, [tensor], request_id=str(i))
            results = [answers.get(timeout=30) for _ in range(10)]
            client.stop_stream()
            client.close()
            assert all(error is None for _, error in results), results
            versions = {result.get_response().model_version for result, _ in results}
            by_unary = {_version_of(r) for r in _send(gateway.address, 3, headers={STICKY: user})}
            assert len(versions) == 1 and versions == by_unary, (user, versions, by_unary)
