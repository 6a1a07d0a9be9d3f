"""Stock clients get the same answers from the gateway as from Triton itself, for every example model.

Each case sends one request twice — to a Triton server directly and through the gateway — with
tritonclient.grpc, tritonclient.grpc.aio and the streaming API, and compares everything the client
sees: outputs (values, datatypes, shapes), model name and version, request id, metadata and config.
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

MODELS = [
    "simple_scale", "add_sub", "dtypes", "bytes_reverse", "mlp",
    "repeat_decoupled", "accumulate_sequence", "fixed_cost",
]

rng = np.random.default_rng(7)


def make_inputs(model: str, rows: int = 3) -> list[triton_grpc.InferInput]:
    def tensor(name, array, datatype):
        item = triton_grpc.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    if model in ("simple_scale", "fixed_cost", "mlp"):
        return [tensor("INPUT0", rng.standard_normal((rows, 16)).astype(np.float32), "FP32")]
    if model == "add_sub":
        return [
            tensor("INPUT0", rng.standard_normal((rows, 16)).astype(np.float32), "FP32"),
            tensor("INPUT1", rng.standard_normal((rows, 16)).astype(np.float32), "FP32"),
        ]
    if model == "dtypes":
        return [
            tensor("IN_FP16", rng.standard_normal((rows, 5)).astype(np.float16), "FP16"),
            tensor("IN_INT64", rng.integers(-(2**40), 2**40, (rows, 3)), "INT64"),
            tensor("IN_BOOL", rng.integers(0, 2, (rows, 7)).astype(bool), "BOOL"),
        ]
    if model == "bytes_reverse":
        words = np.array([[b"tensor"], [b""], ["h\u00e9llo".encode()]][:rows], dtype=np.object_)
        return [tensor("TEXT", words, "BYTES")]
    raise KeyError(model)


def assert_same_result(direct, through) -> None:
    a, b = direct.get_response(), through.get_response()
    assert b.model_name == a.model_name
    assert b.model_version == a.model_version
    assert b.id == a.id
    assert [(o.name, o.datatype, list(o.shape)) for o in b.outputs] == [
        (o.name, o.datatype, list(o.shape)) for o in a.outputs
    ]
    for output in a.outputs:
        np.testing.assert_array_equal(through.as_numpy(output.name), direct.as_numpy(output.name))


@pytest.fixture(scope="module")
def clients(triton, gateway):
    direct = triton_grpc.InferenceServerClient(triton.grpc_address)
    through = triton_grpc.InferenceServerClient(gateway.address)
    yield direct, through
    direct.close()
    through.close()


@pytest.mark.parametrize("model", ["simple_scale", "add_sub", "dtypes", "bytes_reverse", "mlp", "fixed_cost"])
def test_infer_matches_triton(clients, model):
    direct, through = clients
    inputs = make_inputs(model)
    a = direct.infer(model, inputs, request_id=f"id-{model}")
    b = through.infer(model, inputs, request_id=f"id-{model}")
    assert b.get_response().id == f"id-{model}"
    assert_same_result(a, b)


def test_requested_output_selection(clients):
    direct, through = clients
    inputs = make_inputs("add_sub")
    outputs = [triton_grpc.InferRequestedOutput("OUTPUT1")]
    a = direct.infer("add_sub", inputs, outputs=outputs)
    b = through.infer("add_sub", inputs, outputs=outputs)
    assert [o.name for o in b.get_response().outputs] == ["OUTPUT1"]
    assert_same_result(a, b)


def test_explicit_version(clients):
    direct, through = clients
    inputs = make_inputs("simple_scale")
    assert_same_result(direct.infer("simple_scale", inputs, model_version="1"),
                       through.infer("simple_scale", inputs, model_version="1"))


@pytest.mark.parametrize("model", MODELS)
def test_metadata_and_config_match_triton(clients, model):
    direct, through = clients
    assert through.get_model_metadata(model) == direct.get_model_metadata(model)
    assert through.get_model_config(model) == direct.get_model_config(model)
    assert through.is_model_ready(model)


def test_server_level_calls(clients):
    _, through = clients
    assert through.is_server_live()
    assert through.is_server_ready()
    metadata = through.get_server_metadata()
    assert metadata.name == "triton" and "tensorgate" in metadata.extensions  # stock tooling checks the name
    names = {m.name for m in through.get_model_repository_index().models}
    assert set(MODELS) <= names


def _typed_request(model: str, datatype: str, field: str, values, shape) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="INPUT0" if model != "bytes_reverse" else "TEXT", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(
    "model,datatype,field,values,shape",
    [
        ("simple_scale", "FP32", "fp32_contents", [float(i) / 3 for i in range(32)], [2, 16]),
        ("bytes_reverse", "BYTES", "bytes_contents", [b"abc", b"\x00\xff"], [2, 1]),
    ],
)
def test_typed_contents_match_triton(triton, gateway, model, datatype, field, values, shape):
    request = _typed_request(model, datatype, field, values, shape)
    answers = []
    for address in (triton.grpc_address, gateway.address):
        with grpc.insecure_channel(address) as channel:
            answers.append(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request))
    direct, through = answers
    assert through == direct


async def test_aio_client_matches_triton(triton, gateway):
    direct = triton_aio.InferenceServerClient(triton.grpc_address)
    through = triton_aio.InferenceServerClient(gateway.address)
    try:
        for model in ("simple_scale", "add_sub", "bytes_reverse"):
            inputs = make_inputs(model)
            a = await direct.infer(model, inputs, request_id="aio")
            b = await through.infer(model, inputs, request_id="aio")
            assert_same_result(a, b)
        assert await through.get_model_metadata("mlp") == await direct.get_model_metadata("mlp")
    finally:
        await direct.close()
        await through.close()


def _stream_results(address: str, requests: list[tuple[str, list, dict]]) -> list:
    """Send requests over one tritonclient stream; return (id, result or error) in arrival order."""
    results: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for model, inputs, options in requests:
        client.async_stream_infer(model, inputs, **options)
    expected = sum(options.pop("_responses", 1) for _, _, options in requests)
    collected = [results.get(timeout=30) for _ in range(expected)]
    client.stop_stream()
    client.close()
    return collected


def test_stream_matches_triton(triton, gateway):
    requests = [(m, make_inputs(m), {"request_id": f"s{i}"}) for i, m in enumerate(["simple_scale", "add_sub", "bytes_reverse", "mlp"])]
    direct = {r.get_response().id: r for r, e in _stream_results(triton.grpc_address, [(m, i, dict(o)) for m, i, o in requests])}
    through = _stream_results(gateway.address, [(m, i, dict(o)) for m, i, o in requests])
    assert all(error is None for _, error in through), [e for _, e in through]
    assert {r.get_response().id for r, _ in through} == set(direct)
    for result, _ in through:
        assert_same_result(direct[result.get_response().id], result)
