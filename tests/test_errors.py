"""Bad requests get a gRPC status a client can act on, decided at the gateway before forwarding."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def forwarded(gateway) -> int:
    return sum(b["served"] + b["failed"] for b in gateway.snapshot()["backends"].values())


def good_request(rows: int = 1) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="simple_scale")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    request.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return request


def expect_status(stub, request, code, *fragments):
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == code, error.value.details()
    for fragment in fragments:
        assert fragment in error.value.details()
    return error.value.details()


def test_unknown_model_and_version(stub):
    request = good_request()
    request.model_name = "no_such_model"
    expect_status(stub, request, grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'no_such_model'", "simple_scale")
    request = good_request()
    request.model_version = "9"
    expect_status(stub, request, grpc.StatusCode.NOT_FOUND, "'simple_scale' version 9 is not found", "available versions: 1")


def _mutations():
    def wrong_datatype(r):
        r.inputs[0].datatype = "INT32"

    def wrong_shape(r):
        r.inputs[0].shape[:] = [1, 15]

    def byte_size_mismatch(r):
        r.raw_input_contents[0] = r.raw_input_contents[0][:-4]

    def missing_input(r):
        del r.inputs[:]
        del r.raw_input_contents[:]

    def extra_input(r):
        r.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 16])
        r.raw_input_contents.append(np.ones(16, np.float32).tobytes())

    def typed_count_wrong(r):
        del r.raw_input_contents[:]
        r.inputs[0].contents.fp32_contents.extend([1.0] * 15)

    def typed_wrong_field(r):
        del r.raw_input_contents[:]
        r.inputs[0].contents.int_contents.extend([1] * 16)

    def batch_too_large(r):
        r.inputs[0].shape[:] = [65, 16]
        r.raw_input_contents[0] = np.ones((65, 16), np.float32).tobytes()

    def unknown_output(r):
        r.outputs.add(name="NOPE")

    return {
        "wrong_datatype": (wrong_datatype, ["data-type is 'INT32'", "expects 'FP32'"]),
        "wrong_shape": (wrong_shape, ["Expected [-1,16], got [1,15]"]),
        "byte_size_mismatch": (byte_size_mismatch, ["Expected 64, got 60", "16 elements of FP32"]),
        "missing_input": (missing_input, ["missing required input(s) ['INPUT0']"]),
        "extra_input": (extra_input, ["Got input(s) ['EXTRA','INPUT0']", "Expected inputs: INPUT0"]),
        "typed_count_wrong": (typed_count_wrong, ["Expected 64, got 60", "16 elements of FP32"]),
        "typed_wrong_field": (typed_wrong_field, ["of type 'INT32', expected datatype 'FP32'"]),
        "batch_too_large": (batch_too_large, ["batch-size must be <= 64"]),
        "unknown_output": (unknown_output, ["unexpected inference output 'NOPE'", "expected one of: OUTPUT0"]),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_invalid_requests_rejected_before_forwarding(stub, gateway, case):
    mutate, fragments = _mutations()[case]
    request = good_request()
    mutate(request)
    before = forwarded(gateway)
    expect_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert forwarded(gateway) == before, "an invalid request must not reach a backend"


def test_corrupt_bytes_tensor(stub, gateway):
    request = service_pb2.ModelInferRequest(model_name="bytes_reverse")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\xff\x00\x00\x00abc")  # claims 255 bytes, has 3
    before = forwarded(gateway)
    expect_status(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "expecting string of length 255 but only 3 bytes")
    assert forwarded(gateway) == before


def test_oversized_message_names_the_limit(tritons):
    from gateway.testing import GatewayThread

    config = {
        "listen": "127.0.0.1:0",
        "pools": {"p": {"backends": [tritons[0].grpc_address]}},
        "server": {"max_message_bytes": 4096},
    }
    with GatewayThread(config) as small, grpc.insecure_channel(small.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(good_request(rows=64))  # 4 KiB of tensor + framing
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in error.value.details()
        assert stub.ModelInfer(good_request(rows=1)).outputs  # small ones still pass


def test_apis_that_do_not_cross_the_gateway(gateway):
    client = triton_grpc.InferenceServerClient(gateway.address)
    refused = {
        "shared memory": (lambda: client.register_system_shared_memory("r", "/k", 64), "StatusCode.UNIMPLEMENTED"),
        "cuda shared memory": (lambda: client.get_cuda_shared_memory_status(), "StatusCode.UNIMPLEMENTED"),
        "load": (lambda: client.load_model("simple_scale"), "StatusCode.PERMISSION_DENIED"),
        "unload": (lambda: client.unload_model("simple_scale"), "StatusCode.PERMISSION_DENIED"),
        "trace": (lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}), "StatusCode.PERMISSION_DENIED"),
        "log": (lambda: client.update_log_settings({"log_verbose_level": 1}), "StatusCode.PERMISSION_DENIED"),
    }
    for name, (call, status) in refused.items():
        with pytest.raises(triton_grpc.InferenceServerException) as error:
            call()
        assert error.value.status() == status, name
        assert "gateway" in error.value.message(), name


def test_shared_memory_input_is_unimplemented(stub):
    request = good_request()
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    del request.raw_input_contents[:]
    expect_status(stub, request, grpc.StatusCode.UNIMPLEMENTED, "shared-memory")


def test_garbage_bytes_are_invalid_argument(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff\xff\xff")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_errors_keep_the_stream_open(gateway):
    import queue

    results: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(gateway.address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    good = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.ones((1, 16), np.float32))
    bad = triton_grpc.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.ones((1, 16), np.int32))
    client.async_stream_infer("simple_scale", [bad], request_id="bad")
    client.async_stream_infer("simple_scale", [good], request_id="good")
    outcomes = [results.get(timeout=30) for _ in range(2)]
    client.stop_stream()
    errors = [e for _, e in outcomes if e is not None]
    successes = [r for r, e in outcomes if e is None]
    assert len(errors) == 1 and "data-type is 'INT32'" in errors[0].message()
    assert len(successes) == 1 and successes[0].get_response().id == "good"
