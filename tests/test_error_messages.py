"""Error messages say what a client needs, bounded in length; what only an operator may read
(backend addresses, gRPC's and the socket's own error text) stays in the gateway's log.

A client that sends a 1 MB model name gets NOT_FOUND with the name's first characters and its
length, not the megabyte back (which overflowed the client's 8 KiB header limit: it saw "Stream
removed" instead of the status). A backend that dies under a request is UNAVAILABLE (retryable)
without its address or the transport's text. Both engines.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.local.triton import LocalTriton, default_model_repository
from gateway.server.rpc import MAX_MESSAGE_CHARS
from tests.conftest import gateway_on
from tests.waiting import wait_until

ENGINES = ["grpcio-uvloop", "envoy", "h2"]


def infer_request(model: str = "simple_scale") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request


def test_a_megabyte_of_client_text_is_not_echoed(gateway):
    huge = "m" * (1 << 20)
    with grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for request in (infer_request(huge), service_pb2.ModelMetadataRequest(name=huge)):
            call = stub.ModelInfer if isinstance(request, service_pb2.ModelInferRequest) else stub.ModelMetadata
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value.details()
            details = error.value.details()
            assert len(details) <= MAX_MESSAGE_CHARS + 100
            assert f"'{'m' * 128}… ({1 << 20} characters)'" in details
            assert details.startswith("Request for unknown model: ")  # Triton's wording, still
    # A stock client sees the status too (with the megabyte it saw "Stream removed").
    client = triton_grpc.InferenceServerClient(gateway.address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    with pytest.raises(triton_grpc.InferenceServerException) as error:
        client.infer(huge, [tensor], client_timeout=30)
    assert error.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_long_tensor_names_and_ids_are_bounded_too(gateway):
    request = infer_request()
    request.id = "i" * 100_000
    request.inputs[0].name = "n" * 100_000
    with grpc.insecure_channel(gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.value.details()) <= MAX_MESSAGE_CHARS + 100
    assert "(100000 characters)" in error.value.details()


@pytest.fixture
def doomed_triton(tmp_path):
    server = LocalTriton(default_model_repository(), name="doomed", log_dir=tmp_path).start()
    yield server
    server.stop()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("transport", ["http", "grpc-stream"])
def test_a_dead_backend_is_unavailable_without_its_address(doomed_triton, engine, transport, caplog):
    address = doomed_triton.grpc_address
    config = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [address]}},
              "upstream": {"transport": transport},
              # The health checks must not notice first: the request itself meets the dead backend.
              "health": {"interval_s": 600, "timeout_s": 5},
              "routing": {"retry_unavailable": False}}
    with gateway_on(engine, config) as gateway, grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request(), timeout=30)  # the model is known, the connection open
        doomed_triton.kill()
        with caplog.at_level(logging.WARNING, logger="gateway"), pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(), timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # retryable
        details = error.value.details()
        host, port = address.rsplit(":", 1)
        for secret in (address, port, host, doomed_triton.http_address, "ipv4:", "Connection refused",
                       "errno", "Socket closed", "Broken pipe", "stream broke"):
            assert secret not in details, f"{secret!r} leaked in {details!r}"
        assert "retry" in details
        if engine != "envoy":  # in this process: the log line keeps what the client is not told
            assert any(address in record.getMessage() for record in caplog.records), caplog.text


def test_a_model_asked_before_any_backend_reported_is_unavailable_then_known(tmp_path):
    """Before any backend has passed a health check the gateway cannot tell an unknown model from one
    not reported yet: UNAVAILABLE (retry), without the backend's address. Once one reports: the
    model is served, and a model it does not serve is NOT_FOUND again."""
    from gateway.local.triton import find_free_port

    grpc_port = find_free_port()
    address = f"127.0.0.1:{grpc_port}"  # nothing listens there yet
    config = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [address]}}, "health": {"interval_s": 0.2}}
    with gateway_on("grpcio-uvloop", config) as gateway, grpc.insecure_channel(gateway.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(), timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "simple_scale" in error.value.details() and "retry" in error.value.details()
        assert str(grpc_port) not in error.value.details()
        server = LocalTriton(default_model_repository(), name="late", log_dir=tmp_path, grpc_port=grpc_port).start()
        try:
            wait_until(lambda: gateway.snapshot()["backends"][address]["health"] == "healthy", "the late Triton to report", 30)
            assert stub.ModelInfer(infer_request(), timeout=30).model_name == "simple_scale"
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(infer_request("no_such_model"), timeout=30)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            server.stop()
