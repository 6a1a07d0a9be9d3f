"""Security at the front door, on every engine: TLS and mutual TLS with certificates made here,
tenants (bearer tokens, API keys), model allow-lists, rates, request limits, streams per connection.

Real Tritons from the wheel (the session's shared pair), the real gateway on a real port, stock
clients: tritonclient.grpc with `ssl=True` and its certificate arguments, and grpc itself where a
test must read trailing metadata (tritonclient does not show it).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from tests.conftest import gateway_on
from tests.pki import Pki
from tests.waiting import wait_until

ENGINES = ["grpcio", "envoy", "h2"]
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
SNAPSHOT = "/tensorgate.admin.v1.GatewayService/GetSnapshot"


def base_config(tritons) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"main": {"backends": [tritons[0].grpc_address]}},
        "health": {"interval_s": 0.5},
    }


def scale_inputs(rows: int = 1) -> list:
    tensor = triton_grpc.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 16), np.float32))
    return [tensor]


def add_sub_inputs() -> list:
    tensors = []
    for name in ("INPUT0", "INPUT1"):
        tensor = triton_grpc.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        tensors.append(tensor)
    return tensors


def scale_request(rows: int = 1) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="simple_scale")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    del tensor
    request.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return request


def wait_ready(client, headers=None, model: str = "simple_scale", timeout: float = 60.0) -> None:
    """Until the gateway routes `model` (its first health check may fail on a busy machine)."""
    wait_until(lambda: client.is_model_ready(model, headers=headers), f"{model} to be ready at the gateway", timeout,
               step=0.1)


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(triton_grpc.InferenceServerException) as error:
        call()
    return error.value.status(), error.value.message()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    maker = Pki(tmp_path_factory.mktemp("pki"))
    ca = maker.authority("tensorgate-test-ca")
    other = maker.authority("some-other-ca")
    return SimpleNamespace(
        ca=ca,
        other=other,
        server=maker.issue(ca, "gateway", hosts=("127.0.0.1", "localhost")),
        client=maker.issue(ca, "client-a", client=True),
        stranger=maker.issue(other, "stranger", client=True),
    )


# ---- TLS and mutual TLS ------------------------------------------------------------------------


def _tls_client(address: str, pki, cert=None, root=None) -> triton_grpc.InferenceServerClient:
    root = root or pki.ca
    return triton_grpc.InferenceServerClient(
        address, ssl=True, root_certificates=str(root.cert),
        private_key=None if cert is None else str(cert.key),
        certificate_chain=None if cert is None else str(cert.cert),
    )


def _refused(client) -> None:
    """The client cannot get a call through (the TLS handshake fails): UNAVAILABLE, every time."""
    for _ in range(3):
        with pytest.raises(triton_grpc.InferenceServerException) as error:
            client.infer("simple_scale", scale_inputs(), client_timeout=10)
        assert error.value.status() == "StatusCode.UNAVAILABLE", error.value


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_front_door(engine, tritons, pki):
    config = base_config(tritons)
    config["server"] = {"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key)}}
    with gateway_on(engine, config) as gateway:
        client = _tls_client(gateway.address, pki)
        wait_ready(client)
        result = client.infer("simple_scale", scale_inputs(), client_timeout=20)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2.0, np.float32))
        # A plaintext client gets nothing, nor one that does not trust the gateway's CA.
        _refused(triton_grpc.InferenceServerClient(gateway.address))
        _refused(_tls_client(gateway.address, pki, root=pki.other))


@pytest.mark.parametrize("engine", ENGINES)
def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(engine, tritons, pki):
    config = base_config(tritons)
    config["server"] = {"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                                "client_ca_file": str(pki.ca.cert)}}
    with gateway_on(engine, config) as gateway:
        client = _tls_client(gateway.address, pki, cert=pki.client)
        wait_ready(client)
        result = client.infer("simple_scale", scale_inputs(), client_timeout=20)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2.0, np.float32))
        _refused(_tls_client(gateway.address, pki))  # no certificate
        _refused(_tls_client(gateway.address, pki, cert=pki.stranger))  # a certificate of another CA
        # and the good client still gets through afterwards
        assert client.is_server_live()


# ---- tenants -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def tenants(request, tritons, tmp_path_factory):
    """A gateway with four tenants; their credentials are made here, passed through the
    environment and a file, and kept in `credentials` for the clients."""
    folder = tmp_path_factory.mktemp("secrets")
    credentials = {name: secrets.token_urlsafe(24) for name in ("alpha", "alpha_key", "beta", "slow", "ops")}
    variables = {f"TENSORGATE_TEST_TOKEN_{name.upper()}": credentials[name] for name in ("alpha", "beta", "slow", "ops")}
    os.environ.update(variables)
    keys_file = folder / "alpha.keys"
    keys_file.write_text(f"# alpha's API keys, one a line\n{credentials['alpha_key']}\n")
    config = base_config(tritons)
    config["auth"] = {"tenants": {
        "alpha": {"tokens": [{"env": "TENSORGATE_TEST_TOKEN_ALPHA"}], "api_keys": [{"file": str(keys_file)}],
                  "models": ["simple_scale"]},
        "beta": {"tokens": [{"env": "TENSORGATE_TEST_TOKEN_BETA"}], "models": ["add_sub"]},
        "slow": {"tokens": [{"env": "TENSORGATE_TEST_TOKEN_SLOW"}], "models": ["*"],
                 "rate": {"requests_per_s": 0.05, "burst": 3}},
        "ops": {"tokens": [{"env": "TENSORGATE_TEST_TOKEN_OPS"}], "models": ["*"], "admin": True},
    }}
    thread = gateway_on(request.param, config)
    with thread:
        ops = bearer(credentials["ops"])
        for model in ("simple_scale", "add_sub"):
            wait_ready(triton_grpc.InferenceServerClient(thread.address), ops, model)
        yield SimpleNamespace(gateway=thread, credentials=credentials, engine=request.param)
    for name in variables:
        os.environ.pop(name, None)


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def test_no_or_a_wrong_credential_is_unauthenticated_every_time(tenants):
    client = triton_grpc.InferenceServerClient(tenants.gateway.address)
    alpha = tenants.credentials["alpha"]
    wrong = [
        {},
        bearer("not-a-token"),
        bearer(alpha + "x"),
        {"authorization": f"Basic {alpha}"},
        {"authorization": "Bearer "},
        {"x-api-key": "not-a-key"},
        {"x-api-key": alpha},  # a bearer token is not an API key
        bearer(tenants.credentials["alpha_key"]),  # nor the other way round
    ]
    for headers in wrong:
        for _ in range(5):
            status, message = status_of(lambda: client.infer("simple_scale", scale_inputs(), headers=headers))
            assert status == "StatusCode.UNAUTHENTICATED", (headers, message)
            assert alpha not in message
        for call in (lambda: client.get_model_metadata("simple_scale", headers=headers),
                     lambda: client.get_model_config("simple_scale", headers=headers),
                     lambda: client.get_model_repository_index(headers=headers),
                     lambda: client.get_inference_statistics(headers=headers),
                     lambda: client.get_server_metadata(headers=headers)):
            assert status_of(call)[0] == "StatusCode.UNAUTHENTICATED", headers
    # A stream without a credential ends at once, UNAUTHENTICATED.
    with grpc.insecure_channel(tenants.gateway.address) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                       response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as error:
            list(stream(iter([scale_request()]), timeout=20))
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_right_credential_gets_through_as_token_or_api_key(tenants):
    client = triton_grpc.InferenceServerClient(tenants.gateway.address)
    for headers in (bearer(tenants.credentials["alpha"]), {"x-api-key": tenants.credentials["alpha_key"]}):
        result = client.infer("simple_scale", scale_inputs(), headers=headers, client_timeout=20)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2.0, np.float32))


def test_health_stays_open(tenants):
    client = triton_grpc.InferenceServerClient(tenants.gateway.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    with grpc.insecure_channel(tenants.gateway.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_tenant_may_use_only_its_models_and_learns_of_no_others(tenants):
    client = triton_grpc.InferenceServerClient(tenants.gateway.address)
    alpha = bearer(tenants.credentials["alpha"])
    for model in ("add_sub", "bytes_reverse", "no_such_model"):  # existing or not: the same answer
        for call in (lambda: client.infer(model, add_sub_inputs(), headers=alpha),
                     lambda: client.get_model_metadata(model, headers=alpha),
                     lambda: client.get_model_config(model, headers=alpha),
                     lambda: client.get_inference_statistics(model, headers=alpha),
                     lambda: client.is_model_ready(model, headers=alpha)):
            status, message = status_of(call)
            assert status == "StatusCode.PERMISSION_DENIED", (model, message)
            assert "alpha" in message and model in message
    assert client.get_model_metadata("simple_scale", headers=alpha).name == "simple_scale"
    assert client.is_model_ready("simple_scale", headers=alpha)
    index = client.get_model_repository_index(headers=alpha)
    assert {model.name for model in index.models} == {"simple_scale"}
    # beta sees add_sub and only that
    beta = bearer(tenants.credentials["beta"])
    assert {model.name for model in client.get_model_repository_index(headers=beta).models} == {"add_sub"}
    assert status_of(lambda: client.infer("simple_scale", scale_inputs(), headers=beta))[0] == "StatusCode.PERMISSION_DENIED"
    client.infer("add_sub", add_sub_inputs(), headers=beta, client_timeout=20)
    client.infer("simple_scale", scale_inputs(), headers=alpha, client_timeout=20)
    # statistics of every model: the gateway has some of both, each tenant is shown its own
    everything = client.get_inference_statistics(headers=bearer(tenants.credentials["ops"]))
    assert {"simple_scale", "add_sub"} <= {stats.name for stats in everything.model_stats}
    statistics = client.get_inference_statistics(headers=alpha)
    assert {stats.name for stats in statistics.model_stats} == {"simple_scale"}


def test_a_stream_refuses_each_request_for_a_model_the_tenant_may_not_use(tenants):
    answers: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(tenants.gateway.address)
    client.start_stream(lambda result, error: answers.put((result, error)),
                        headers=bearer(tenants.credentials["alpha"]))
    try:
        client.async_stream_infer("add_sub", add_sub_inputs(), request_id="denied")
        client.async_stream_infer("simple_scale", scale_inputs(), request_id="allowed")
        got = [answers.get(timeout=20) for _ in range(2)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    results = [result for result, error in got if error is None]
    assert len(errors) == 1 and "may not use model 'add_sub'" in errors[0].message()
    assert len(results) == 1 and results[0].get_response().id == "allowed"


def test_over_the_rate_is_resource_exhausted_with_a_pushback_every_time(tenants):
    slow = tuple(bearer(tenants.credentials["slow"]).items())
    with grpc.insecure_channel(tenants.gateway.address) as channel:
        infer = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                    response_deserializer=service_pb2.ModelInferResponse.FromString)
        for _ in range(3):  # the burst
            infer(scale_request(), metadata=slow, timeout=20)
        # 0.05 requests/s: the next token is 20 s away; every request until then is refused.
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as error:
                infer(scale_request(), metadata=slow, timeout=20)
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
            assert "tenant 'slow' is over its rate limit of 0.05 requests/s" in error.value.details()
            trailers = dict(error.value.trailing_metadata())
            assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 20_000
        # on a stream, each request spends from the same rate: refused one by one, the stream stays open
        stream = channel.stream_stream(STREAM, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                       response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        replies = list(stream(iter([scale_request(), scale_request()]), metadata=slow, timeout=20))
        assert len(replies) == 2
        for reply in replies:
            assert "tenant 'slow' is over its rate limit" in reply.error_message
        assert time.monotonic() - started < 15, "the refusals took too long to test the rate"
        # other tenants are not held back by slow's rate
        infer(scale_request(), metadata=tuple(bearer(tenants.credentials["alpha"]).items()), timeout=20)


def test_admin_services_need_an_admin_tenant(tenants):
    from gateway.admin.gateway_service import Snapshot, SnapshotRequest

    with grpc.insecure_channel(tenants.gateway.address) as channel:
        snapshot = channel.unary_unary(SNAPSHOT, request_serializer=SnapshotRequest.SerializeToString,
                                       response_deserializer=Snapshot.FromString)
        with pytest.raises(grpc.RpcError) as error:
            snapshot(SnapshotRequest(), timeout=10)
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            snapshot(SnapshotRequest(), metadata=tuple(bearer(tenants.credentials["alpha"]).items()), timeout=10)
        assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
        state = json.loads(snapshot(SnapshotRequest(), metadata=tuple(bearer(tenants.credentials["ops"]).items()),
                                    timeout=10).json)
        assert state["backends"]
        assert state["tenants"]["alpha"] is None  # no rate
        assert state["tenants"]["slow"]["rate_limited"] >= 20  # the rate test ran before
        text = json.dumps(state)
    assert not any(secret in text for secret in tenants.credentials.values())


def test_credentials_are_in_no_log_and_no_config_the_engine_sees(tenants):
    """After every test above ran against this gateway (refusals included), no credential shows
    in what it logged or in the config it was handed."""
    gateway = tenants.gateway
    if tenants.engine == "envoy":
        with open(gateway.stderr_path, encoding="utf-8", errors="replace") as log:
            seen = log.read()
        seen += json.dumps(gateway.gateway.engine.envoy_config())
    else:
        seen = repr(gateway.call(lambda: repr(gateway.gateway.guard) + repr(gateway.gateway.guard.directory.tenants)))
    seen += json.dumps(gateway.mapping)
    assert not any(secret in seen for secret in tenants.credentials.values())


# ---- limits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def limited(request, tritons):
    config = base_config(tritons)
    config["limits"] = {"max_tensors": 3, "max_bytes_element_bytes": 16,
                        "models": {"simple_scale": {"max_message_bytes": 200}}}
    with gateway_on(request.param, config) as thread:
        wait_ready(triton_grpc.InferenceServerClient(thread.address))
        yield thread


def test_too_many_tensors_is_invalid_argument(limited):
    client = triton_grpc.InferenceServerClient(limited.address)
    outputs = [triton_grpc.InferRequestedOutput("OUTPUT0"), triton_grpc.InferRequestedOutput("OUTPUT1")]
    for _ in range(3):
        status, message = status_of(lambda: client.infer("add_sub", add_sub_inputs(), outputs=outputs))
        assert status == "StatusCode.INVALID_ARGUMENT"
        assert "request has 4 tensors (2 inputs, 2 outputs requested); the limit is 3" in message
    client.infer("add_sub", add_sub_inputs(), outputs=outputs[:1], client_timeout=20)  # 3 tensors: fine


def test_a_bytes_element_over_the_limit_is_invalid_argument(limited):
    client = triton_grpc.InferenceServerClient(limited.address)

    def text(values: list[bytes]) -> list:
        tensor = triton_grpc.InferInput("TEXT", [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(-1, 1))
        return [tensor]

    status, message = status_of(lambda: client.infer("bytes_reverse", text([b"short", b"x" * 17])))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "input 'TEXT' has a BYTES element of 17 bytes; the limit is 16 bytes" in message
    result = client.infer("bytes_reverse", text([b"y" * 16]), client_timeout=20)
    assert result.as_numpy("REVERSED")[0][0] == b"y" * 16


def test_a_message_over_its_model_limit_is_resource_exhausted(limited):
    client = triton_grpc.InferenceServerClient(limited.address)
    for _ in range(3):
        status, message = status_of(lambda: client.infer("simple_scale", scale_inputs(rows=4)))
        assert status == "StatusCode.RESOURCE_EXHAUSTED"
        assert "over model 'simple_scale''s limit of 200 bytes" in message
    client.infer("simple_scale", scale_inputs(rows=1), client_timeout=20)  # ~100 bytes: fine
    client.infer("add_sub", add_sub_inputs(), client_timeout=20)  # the limit is simple_scale's alone


# ---- HTTP/2 streams per connection ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_streams_per_connection_are_bounded(engine, tritons):
    config = base_config(tritons)
    config["server"] = {"max_concurrent_streams": 2}
    with gateway_on(engine, config) as gateway, grpc.insecure_channel(gateway.address) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                       response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
                                   response_deserializer=service_pb2.ServerLiveResponse.FromString)
        wait_ready(triton_grpc.InferenceServerClient(gateway.address))
        feeds, calls = [], []
        for _ in range(2):  # two streams open, each with an answer back: both are live at the gateway
            feed: queue.Queue = queue.Queue()
            feed.put(scale_request())
            call = stream(iter(feed.get, None), timeout=120)
            assert not next(call).error_message
            feeds.append(feed)
            calls.append(call)
        # A third stream on this connection must wait: the client holds it until one closes.
        with pytest.raises(grpc.RpcError) as error:
            live(service_pb2.ServerLiveRequest(), timeout=2)
        assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        waiting = threading.Thread(target=lambda: feeds[0].put(None))
        waiting.start()
        list(calls[0])  # the first stream ends
        assert live(service_pb2.ServerLiveRequest(), timeout=20).live
        feeds[1].put(None)
        list(calls[1])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rapid_reset_flood_does_not_take_the_gateway_down(engine, tritons):
    """HTTP/2 rapid reset: streams opened and reset at once, 1,500 of them on one connection. Envoy
    counts them as premature resets and closes such connections (its default protection, kept on);
    either engine goes on serving everyone else."""
    with gateway_on(engine, base_config(tritons)) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        wait_ready(client)
        with grpc.insecure_channel(gateway.address) as channel:
            stream = channel.stream_stream(STREAM, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                           response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
            for _ in range(1500):
                feed: queue.Queue = queue.Queue()
                call = stream(iter(feed.get, None), timeout=30)
                call.cancel()
                feed.put(None)
        result = client.infer("simple_scale", scale_inputs(), client_timeout=20)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2.0, np.float32))
        if engine == "envoy":
            stats = gateway.gateway.engine._admin("GET", "/stats?filter=ingress_http.downstream_rq_too_many_premature_resets")
            closed = int(stats.split(":")[1])
            assert closed >= 1, stats
        assert not gateway.take_loop_errors()
