"""The HTTP upstream against real Tritons: stock clients get what Triton itself answers.

The gateways here use `upstream.transport: http`; each case is sent to Triton directly (gRPC) and
through the gateway, and everything the client sees is compared: outputs, ids, parameters,
status codes and messages of failing requests. Also: the client's deadline reaches Triton as its
`timeout`, a backend killed under load costs no request (UNAVAILABLE is retried on the other
backend, which is ejected and comes back), batching rides the transport, and models that must stay
on the stream (decoupled, sequences) still work. The whole suite also runs over this transport
with `TENSORGATE_TEST_UPSTREAM_TRANSPORT=http` (gateway/testing.py).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.local.triton import LocalTriton, default_model_repository
from gateway.testing import GatewayThread
from tests.conftest import start_tritons
from tests.test_conformance import assert_same_result, make_inputs
from tests.waiting import wait_until

BATCHING_OFF = {"default": {"enabled": False}}


def _config(tritons, **extra) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"primary": {"backends": [tritons[0].grpc_address]},
                  "secondary": {"backends": [tritons[1].grpc_address]}},
        "upstream": {"transport": "http"},
        "health": {"interval_s": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def http_gateway(tritons):
    with GatewayThread(_config(tritons, batching=BATCHING_OFF)) as thread:
        yield thread


@pytest.fixture(scope="module")
def clients(triton, http_gateway):
    direct = triton_grpc.InferenceServerClient(triton.grpc_address)
    through = triton_grpc.InferenceServerClient(http_gateway.address)
    yield direct, through
    direct.close()
    through.close()


def _sent_over_http(gateway) -> int:
    return gateway.call(lambda: sum(b.rest.requests for b in gateway.gateway.fleet.backends()))


@pytest.mark.parametrize("model", ["simple_scale", "add_sub", "dtypes", "bytes_reverse", "mlp"])
def test_infer_matches_triton(clients, http_gateway, model):
    direct, through = clients
    before = _sent_over_http(http_gateway)
    inputs = make_inputs(model)
    a = direct.infer(model, inputs, request_id=f"id-{model}", parameters={"note": "x", "n": 3, "flag": True})
    b = through.infer(model, inputs, request_id=f"id-{model}", parameters={"note": "x", "n": 3, "flag": True})
    assert_same_result(a, b)
    assert b.get_response().parameters == a.get_response().parameters
    assert _sent_over_http(http_gateway) == before + 1


def test_requested_outputs_and_classification_match_triton(clients):
    direct, through = clients
    inputs = make_inputs("add_sub")
    outputs = [triton_grpc.InferRequestedOutput("OUTPUT1")]
    assert_same_result(direct.infer("add_sub", inputs, outputs=outputs), through.infer("add_sub", inputs, outputs=outputs))
    classes = [triton_grpc.InferRequestedOutput("OUTPUT0", class_count=3)]
    a = direct.infer("simple_scale", make_inputs("simple_scale"), outputs=classes)
    b = through.infer("simple_scale", make_inputs("simple_scale", 3), outputs=classes)
    assert [(o.name, o.datatype, list(o.shape)) for o in b.get_response().outputs] == [
        (o.name, o.datatype, list(o.shape)) for o in a.get_response().outputs]


def test_explicit_version_and_empty_id(clients):
    direct, through = clients
    inputs = make_inputs("simple_scale")
    a, b = direct.infer("simple_scale", inputs, model_version="1"), through.infer("simple_scale", inputs, model_version="1")
    assert_same_result(a, b)
    assert b.get_response().id == ""


@pytest.mark.parametrize("model,datatype,field,values,shape", [
    ("simple_scale", "FP32", "fp32_contents", [float(i) / 3 for i in range(32)], [2, 16]),
    ("bytes_reverse", "BYTES", "bytes_contents", [b"abc", b"\x00\xff"], [2, 1]),
])
def test_typed_contents_match_triton(triton, http_gateway, model, datatype, field, values, shape):
    """Not batched (batching is off here), typed contents reach the transport as they came."""
    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="INPUT0" if model != "bytes_reverse" else "TEXT", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    answers = []
    for address in (triton.grpc_address, http_gateway.address):
        with grpc.insecure_channel(address) as channel:
            answers.append(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request))
    assert answers[1] == answers[0]


def _error(client, model, inputs, **kwargs):
    with pytest.raises(triton_grpc.InferenceServerException) as caught:
        client.infer(model, inputs, **kwargs)
    return caught.value


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_backend_errors_carry_tritons_code_and_message(clients, mode):
    direct, through = clients
    x = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    m = triton_grpc.InferInput("MODE", [1, 1], "INT32")
    m.set_data_from_numpy(np.array([[mode]], np.int32))
    a, b = _error(direct, "fail_on_demand", [x, m]), _error(through, "fail_on_demand", [x, m])
    assert (b.status(), b.message()) == (a.status(), a.message())


def test_unknown_output_is_invalid_argument_as_from_triton(clients):
    direct, through = clients
    outputs = [triton_grpc.InferRequestedOutput("NOPE")]
    a = _error(direct, "simple_scale", make_inputs("simple_scale"), outputs=outputs)
    b = _error(through, "simple_scale", make_inputs("simple_scale"), outputs=outputs)
    assert b.status() == a.status() == "StatusCode.INVALID_ARGUMENT"


def test_deadline_is_tritons_timeout_and_bounds_the_wait(tritons, http_gateway):
    """A client deadline shorter than the model's queue + execution time: DEADLINE_EXCEEDED, and the
    gateway's pool is left clean (the cancelled request's connection is closed, not reused)."""
    through = triton_grpc.InferenceServerClient(http_gateway.address)
    x = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(through.infer, "fixed_cost", [x], client_timeout=0.004) for _ in range(16)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(bool(call.result().as_numpy("OUTPUT0")[0, 0] == 1.0))  # fixed_cost echoes INPUT0
            except triton_grpc.InferenceServerException as error:
                outcomes.append(error.status())
    assert "StatusCode.DEADLINE_EXCEEDED" in outcomes
    assert set(outcomes) <= {True, "StatusCode.DEADLINE_EXCEEDED"}
    assert through.infer("fixed_cost", [x], client_timeout=10).as_numpy("OUTPUT0")[0, 0] == 1.0
    through.close()


def test_decoupled_and_sequence_models_stay_on_the_stream(http_gateway):
    assert _decoupled_and_sequence_round(http_gateway.address, 4242) == ([4, 5, 6], [1, 3, 6])


def test_batching_rides_the_http_transport(triton, tritons):
    config = _config(tritons, batching={"default": {"mode": "fixed", "max_queue_delay_us": 20000}})
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    with GatewayThread(config) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        direct = triton_grpc.InferenceServerClient(triton.grpc_address)

        def one(index):
            tensor = triton_grpc.InferInput("INPUT0", [2, 16], "FP32")
            tensor.set_data_from_numpy(x + index)
            return client.infer("simple_scale", [tensor], request_id=f"b{index}"), direct.infer("simple_scale", [tensor])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pairs = list(pool.map(one, range(16)))
        for index, (through, alone) in enumerate(pairs):
            assert through.get_response().id == f"b{index}"
            np.testing.assert_array_equal(through.as_numpy("OUTPUT0"), alone.as_numpy("OUTPUT0"))
        batching = gateway.gateway.snapshot()["batching"]["simple_scale:1"]
        assert batching["batches"] < 16, batching
        assert _sent_over_http(gateway) == batching["batches"]
        client.close()
        direct.close()


def test_backend_killed_under_load_costs_no_request(tmp_path):
    pair = start_tritons(2, tmp_path, "http-failover")
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [t.grpc_address for t in pair]}},
              "upstream": {"transport": "http"}, "health": {"interval_s": 0.2, "timeout_s": 0.5},
              "batching": BATCHING_OFF}
    try:
        with GatewayThread(config) as gateway:
            stop, outcomes = threading.Event(), []

            def load():
                client = triton_grpc.InferenceServerClient(gateway.address)
                tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
                tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
                while not stop.is_set():
                    try:
                        outcomes.append(bool(client.infer("simple_scale", [tensor], client_timeout=10)
                                             .as_numpy("OUTPUT0")[0, 0] == 2.0))
                    except triton_grpc.InferenceServerException as error:
                        outcomes.append(error)
                client.close()

            workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
            for worker in workers:
                worker.start()
            try:
                time.sleep(1.0)
                pair[0].kill()
                killed_at = len(outcomes)
                # Two failed checks 0.2 s apart mark it (a busy loop may run them late).
                wait_until(lambda: gateway.snapshot()["backends"][pair[0].grpc_address], "the killed backend unhealthy",
                           timeout=10, accept=lambda snapshot: snapshot["health"] == "unhealthy")
                pair[0].restart()
                restarted_backend = lambda: gateway.snapshot()["backends"][pair[0].grpc_address]  # noqa: E731
                wait_until(restarted_backend, "the restarted backend to come back", 20, step=0.1,
                           accept=lambda backend: backend["health"] == "healthy")
                served_before = restarted_backend()["served"]
                # Back in rotation, it gets requests again: at once with p2c on outstanding requests, within
                # a few EWMA time constants with placement's load score (which remembers its failed calls).
                wait_until(restarted_backend, "the restarted backend to get a request", 10, step=0.1,
                           accept=lambda backend: backend["served"] > served_before)
            finally:  # the load threads must end even when an assertion failed
                stop.set()
                for worker in workers:
                    worker.join(15)
            failures = [o for o in outcomes if o is not True]
            assert not failures, failures[:5]
            assert len(outcomes) > killed_at
            assert gateway.snapshot()["backends"][pair[0].grpc_address]["served"] > served_before
    finally:
        for server in pair:
            server.stop()


def test_decoupled_requests_never_share_a_stream_with_others(tmp_path):
    """Triton 2.51 aborts ("proto_buffer_writer.h ASSERTION FAILED: !byte_buffer->Valid()") when one
    ModelStreamInfer stream carries a decoupled model's requests and others at once; with them on one
    upstream stream this traffic killed its own Triton within a few rounds (12 aborts in 42 rounds).
    The gateway keeps decoupled requests on a stream of their own: Triton lives through it all."""
    with LocalTriton(default_model_repository(), name="mixed-stream", log_dir=tmp_path) as server:
        config = {"listen": "127.0.0.1:0", "pools": {"primary": {"backends": [server.grpc_address]}},
                  "upstream": {"transport": "http"}, "batching": BATCHING_OFF, "health": {"interval_s": 0.5}}
        with GatewayThread(config) as gateway:
            for round_ in range(30):
                assert _decoupled_and_sequence_round(gateway.address, 5000 + round_) == ([4, 5, 6], [1, 3, 6])
                assert server.is_running, f"Triton died in round {round_}:\n{server.log_tail()}"
            streams = gateway.snapshot()["backends"][server.grpc_address]["streams"]
        assert streams == {"shared": [90], "decoupled": [30]}, streams  # each round: 3 sequence steps, 1 decoupled


def _decoupled_and_sequence_round(address: str, sequence_id: int):
    client = triton_grpc.InferenceServerClient(address)
    responses: list = []
    client.start_stream(callback=lambda result, error: responses.append(error or result))
    value = triton_grpc.InferInput("IN", [3], "INT32")
    value.set_data_from_numpy(np.array([4, 5, 6], np.int32))
    client.async_stream_infer("repeat_decoupled", [value], request_id="d")
    for step in range(3):
        item = triton_grpc.InferInput("INPUT", [1, 1], "INT32")
        item.set_data_from_numpy(np.array([[step + 1]], np.int32))
        client.async_stream_infer("accumulate_sequence", [item], sequence_id=sequence_id, sequence_start=step == 0,
                                  sequence_end=step == 2, request_id=f"s{step}")
    wait_until(lambda: len(responses) >= 6, "6 responses", 20, step=0.01, raise_on_timeout=False)
    client.stop_stream(cancel_requests=len(responses) < 6)  # a stream a dying Triton never ends must not hang here
    client.close()
    assert not [r for r in responses if isinstance(r, Exception)], responses
    outs = sorted(int(r.as_numpy("OUT")[0]) for r in responses if r.get_response().id == "d")
    totals = [int(r.as_numpy("OUTPUT")[0][0]) for r in responses if r.get_response().id.startswith("s")]
    return outs, totals
