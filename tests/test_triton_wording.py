"""Refused as Triton refuses: every bad request goes to a real Triton and through the gateway, and the
gateway must answer with Triton's status and a message that holds Triton's (its own guidance may
follow). Triton's wording, as the gateway writes it: gateway/protocol/triton_messages.py.

Also here: errors Triton reports over the gateway's shared upstream stream keep Triton's status, and
Triton's own example client `simple_grpc_health_metadata.py` passes against the gateway.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.testing import GatewayThread

EXAMPLE_CLIENT = Path(__file__).parent / "clients" / "simple_grpc_health_metadata.py"


def _request(model: str = "simple_scale", rows: int = 1) -> service_pb2.ModelInferRequest:
    """A good request for one of the example models."""
    request = service_pb2.ModelInferRequest(model_name=model)

    def add(name, array, datatype):
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())

    if model == "add_sub":
        add("INPUT0", np.ones((rows, 16), np.float32), "FP32")
        add("INPUT1", np.ones((rows, 16), np.float32), "FP32")
    elif model == "bytes_reverse":
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(b"\x03\x00\x00\x00abc")
    elif model == "repeat_decoupled":
        add("IN", np.array([1, 2], np.int32), "INT32")
    elif model == "accumulate_sequence":
        add("INPUT", np.ones((1, 1), np.int32), "INT32")
    else:
        add("INPUT0", np.ones((rows, 16), np.float32), "FP32")
    return request


def _typed(request, field: str, values, datatype: str | None = None):
    del request.raw_input_contents[:]
    if datatype:
        request.inputs[0].datatype = datatype
    getattr(request.inputs[0].contents, field).extend(values)


def _cases() -> dict:
    """name -> (model, how to spoil its good request)."""
    def shape(*dims, index=0):
        return lambda r: r.inputs[index].shape.__setitem__(slice(None), list(dims))

    def extra(r):
        r.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 16])
        r.raw_input_contents.append(np.ones(16, np.float32).tobytes())

    def duplicate(r):
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        r.raw_input_contents.append(np.ones(16, np.float32).tobytes())

    def drop_inputs(r):
        del r.inputs[:]
        del r.raw_input_contents[:]

    def drop_second(r):
        del r.inputs[1]
        del r.raw_input_contents[1]

    def batch(rows):
        def spoil(r):
            r.inputs[0].shape[:] = [rows, 16]
            r.raw_input_contents[0] = np.ones((rows, 16), np.float32).tobytes()
        return spoil

    def second_batch_of_two(r):
        r.inputs[1].shape[:] = [2, 16]
        r.raw_input_contents[1] = np.ones((2, 16), np.float32).tobytes()

    def text(data):
        return lambda r: r.raw_input_contents.__setitem__(0, data)

    def field(r, name, value):
        setattr(r, name, value)

    return {
        # model and version
        "unknown model": ("simple_scale", lambda r: field(r, "model_name", "no_such_model")),
        "empty model name": ("simple_scale", lambda r: field(r, "model_name", "")),
        "unknown version": ("simple_scale", lambda r: field(r, "model_version", "9")),
        "version 0": ("simple_scale", lambda r: field(r, "model_version", "0")),
        "negative version": ("simple_scale", lambda r: field(r, "model_version", "-1")),
        "version not a number": ("simple_scale", lambda r: field(r, "model_version", "abc")),
        "version over 64 bits": ("simple_scale", lambda r: field(r, "model_version", "99999999999999999999")),
        "decoupled model over ModelInfer": ("repeat_decoupled", lambda r: None),
        # datatype and shape
        "wrong datatype": ("simple_scale", lambda r: field(r.inputs[0], "datatype", "INT32")),
        "not a datatype": ("simple_scale", lambda r: field(r.inputs[0], "datatype", "FLOAT")),
        "no datatype": ("simple_scale", lambda r: field(r.inputs[0], "datatype", "")),
        "wrong shape": ("simple_scale", shape(1, 15)),
        "no batch dimension": ("simple_scale", shape(16)),
        "one dimension too many": ("simple_scale", shape(1, 16, 1)),
        "no shape": ("simple_scale", shape()),
        "-1 in a request's shape": ("simple_scale", shape(1, -1)),
        # (over ModelInfer Triton refuses the decoupled model first; over a stream, the shape)
        "wrong shape, model without batching": ("repeat_decoupled", shape(1, 2)),
        "batch too large": ("simple_scale", batch(65)),
        "batch sizes differ": ("add_sub", second_batch_of_two),
        # inputs and outputs
        "missing input": ("simple_scale", drop_inputs),
        "one of two inputs missing": ("add_sub", drop_second),
        "extra input": ("simple_scale", extra),
        "extra input beside two": ("add_sub", extra),
        "unknown input name": ("add_sub", lambda r: field(r.inputs[1], "name", "EXTRA")),
        "input given twice": ("simple_scale", duplicate),
        "unknown output": ("simple_scale", lambda r: r.outputs.add(name="NOPE")),
        "two unknown outputs": ("simple_scale", lambda r: (r.outputs.add(name="ZZ"), r.outputs.add(name="AA"))),
        # tensor contents
        "raw contents too short": ("simple_scale", lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 60)),
        "no contents": ("simple_scale", lambda r: r.raw_input_contents.__delitem__(slice(None))),
        "fewer raw buffers than inputs": ("add_sub", lambda r: r.raw_input_contents.__delitem__(1)),
        "typed contents beside raw": ("simple_scale", lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 16)),
        "typed contents too short": ("simple_scale", lambda r: _typed(r, "fp32_contents", [1.0] * 15)),
        "typed contents of another type": ("simple_scale", lambda r: _typed(r, "int_contents", [1] * 16)),
        "typed contents for FP16": ("simple_scale", lambda r: _typed(r, "fp32_contents", [1.0] * 16, "FP16")),
        "two typed contents": ("simple_scale", lambda r: (
            _typed(r, "fp32_contents", [1.0] * 16), r.inputs[0].contents.bool_contents.extend([True] * 16))),
        "BYTES element cut short": ("bytes_reverse", text(b"\xff\x00\x00\x00abc")),
        "BYTES length cut short": ("bytes_reverse", text(b"\x01\x00\x00\x00a\x00\x00")),
        "too many BYTES elements": ("bytes_reverse", text(b"\x01\x00\x00\x00a" * 3)),
        "too few BYTES elements": ("bytes_reverse", text(b"")),
        "too many typed BYTES": ("bytes_reverse", lambda r: _typed(r, "bytes_contents", [b"a", b"b"])),
        # parameters Triton's front end checks (refused by the gateway itself, whatever the transport)
        "reserved parameter": ("simple_scale", lambda r: setattr(r.parameters["triton_x"], "bool_param", True)),
        "sequence_id of the wrong type": ("simple_scale", lambda r: setattr(r.parameters["sequence_id"], "double_param", 1.5)),
        "sequence_start of the wrong type": ("simple_scale", lambda r: setattr(r.parameters["sequence_start"], "int64_param", 1)),
        "priority of the wrong type": ("simple_scale", lambda r: setattr(r.parameters["priority"], "string_param", "high")),
        "timeout of the wrong type": ("simple_scale", lambda r: setattr(r.parameters["timeout"], "uint64_param", 10)),
        # (issue 13: these came back INTERNAL through the gateway's HTTP upstream)
        "timeout as a string": ("simple_scale", lambda r: setattr(r.parameters["timeout"], "string_param", "10")),
        "empty final response flag as a string": ("simple_scale", lambda r: setattr(
            r.parameters["triton_enable_empty_final_response"], "string_param", "true")),
        "negative priority": ("simple_scale", lambda r: setattr(r.parameters["priority"], "int64_param", -1)),
        "unsigned parameter": ("simple_scale", lambda r: setattr(r.parameters["custom"], "uint64_param", 1)),
        "parameter without a value": ("simple_scale", lambda r: r.parameters["custom"].CopyFrom(
            service_pb2.InferParameter())),
        "classification of the wrong type": ("simple_scale", lambda r: setattr(
            r.outputs.add(name="OUTPUT0").parameters["classification"], "string_param", "3")),
        "typed contents beside raw, two inputs": ("add_sub", lambda r: r.inputs[1].contents.fp32_contents.extend(
            [1.0] * 16)),
        # several faults at once: the one Triton names first
        "both inputs of the wrong datatype": ("add_sub", lambda r: [field(t, "datatype", "INT32") for t in r.inputs]),
        "wrong datatype and shape": ("simple_scale", lambda r: (field(r.inputs[0], "datatype", "INT32"), shape(1, 15)(r))),
        "batch too large and wrong datatype": ("simple_scale", lambda r: (batch(65)(r), field(r.inputs[0], "datatype", "INT32"))),
    }


CASES = _cases()

#: Refusals where the gateway says something else than Triton, on purpose: the same status, the
#: gateway's own message. Triton carries on with such a request and fails it with a number that
#: does not explain anything ("Expected 274877906880, got 64" for a batch of -1).
OWN_WORDING = {
    "batch of -1": ("simple_scale", lambda r: r.inputs[0].shape.__setitem__(slice(None), [-1, 16])),
    "batch of 0": ("simple_scale", lambda r: (r.inputs[0].shape.__setitem__(slice(None), [0, 16]),
                                             r.raw_input_contents.__setitem__(0, b""))),
}

#: Triton serves a request with more raw buffers than inputs (it ignores the rest); the gateway
#: refuses it, since it cannot batch buffers that do not pair with inputs.
STRICTER = ("simple_scale", lambda r: r.raw_input_contents.append(b"1234"))


def _spoiled(case, request_id: str = "") -> service_pb2.ModelInferRequest:
    model, spoil = case
    request = _request(model)
    request.id = request_id
    spoil(request)
    return request


def _unary(address: str, request) -> tuple[str, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return "OK", ""


def _stream(address: str, request) -> str:
    """The error_message of the one answer to `request` over ModelStreamInfer ("" if it succeeded)."""
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for answer in stub.ModelStreamInfer(iter([request]), timeout=30):
            return answer.error_message
    raise AssertionError("the stream ended without an answer")


def forwarded(gateway) -> int:
    return sum(b["served"] + b["failed"] for b in gateway.snapshot()["backends"].values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_infer_refusal_is_tritons(triton, gateway, case):
    request = _spoiled(CASES[case])
    direct = _unary(triton.grpc_address, request)
    through = _unary(gateway.address, request)
    assert direct[0] != "OK", f"Triton served it: the case does not test a refusal ({direct})"
    assert through[0] == direct[0], f"Triton: {direct}\ngateway: {through}"
    assert direct[1] in through[1], f"Triton: {direct[1]!r}\ngateway: {through[1]!r}"


@pytest.mark.parametrize("case", sorted(name for name in CASES if CASES[name][0] != "repeat_decoupled"
                                        or "shape" in name))
def test_stream_refusal_is_tritons(triton, gateway, case):
    request = _spoiled(CASES[case], request_id="client-7")  # the id Triton quotes, not the gateway's own
    direct = _stream(triton.grpc_address, request)
    through = _stream(gateway.address, request)
    assert direct, "Triton served it over the stream"
    assert direct in through, f"Triton: {direct!r}\ngateway: {through!r}"


@pytest.mark.parametrize("case", sorted(OWN_WORDING))
def test_refusals_in_the_gateways_own_words_keep_tritons_status(triton, gateway, case):
    request = _spoiled(OWN_WORDING[case])
    direct = _unary(triton.grpc_address, request)
    through = _unary(gateway.address, request)
    assert through[0] == direct[0] == "INVALID_ARGUMENT"
    assert "batch size" in through[1] and "expected 1 to 64" in through[1]


@pytest.mark.parametrize("parameter", ["binary_data_output", "triton_enable_empty_final_response"])
def test_http_only_and_stream_only_parameters_are_served_as_triton_serves_them(triton, gateway, parameter):
    """Meaningless over unary gRPC, and served by Triton there; the HTTP upstream must not hand
    them to Triton's HTTP endpoint, which reads (binary_data_output: a double failed as INTERNAL) or
    refuses (triton_ keys) them."""
    request = _request()
    request.outputs.add(name="OUTPUT0")
    if parameter == "binary_data_output":
        request.parameters[parameter].double_param = 0.5
    else:
        request.parameters[parameter].bool_param = False
    assert _unary(triton.grpc_address, request) == ("OK", "")
    assert _unary(gateway.address, request) == ("OK", "")


def test_extra_raw_buffer_is_refused_although_triton_serves_it(triton, gateway):
    request = _spoiled(STRICTER)
    assert _unary(triton.grpc_address, request) == ("OK", "")
    code, message = _unary(gateway.address, request)
    assert code == "INVALID_ARGUMENT" and "2 raw_input_contents for 1 inputs" in message


def test_versions_are_read_as_triton_reads_them(triton, gateway):
    """Triton reads a version with std::stol: leading blanks, a sign, leading zeros and anything
    after the digits are accepted."""
    for version in ("1", "01", " 1", "+1", "1abc"):
        request = _request()
        request.model_version = version
        assert _unary(triton.grpc_address, request) == ("OK", ""), version
        assert _unary(gateway.address, request) == ("OK", ""), version


def _client_refusal(call) -> tuple[str, str]:
    try:
        call()
    except triton_grpc.InferenceServerException as error:
        return error.status(), error.message()
    return "OK", ""


@pytest.mark.parametrize(
    "what,call",
    [
        ("metadata, unknown model", lambda c: c.get_model_metadata("no_such_model")),
        ("metadata, unknown model and version", lambda c: c.get_model_metadata("no_such_model", "2")),
        ("metadata, unknown version", lambda c: c.get_model_metadata("simple_scale", "9")),
        ("metadata, version not a number", lambda c: c.get_model_metadata("simple_scale", "abc")),
        ("config, unknown model", lambda c: c.get_model_config("no_such_model")),
        ("config, unknown version", lambda c: c.get_model_config("simple_scale", "9")),
        ("statistics, unknown model", lambda c: c.get_inference_statistics("no_such_model")),
        ("statistics, unknown model and version", lambda c: c.get_inference_statistics("no_such_model", "2")),
        ("statistics, unknown version", lambda c: c.get_inference_statistics("simple_scale", "9")),
        ("ready, unknown model", lambda c: c.is_model_ready("no_such_model")),
        ("ready, unknown version", lambda c: c.is_model_ready("simple_scale", "9")),
    ],
)
def test_model_refusal_is_tritons(triton, gateway, what, call):
    direct = _client_refusal(lambda: call(triton_grpc.InferenceServerClient(triton.grpc_address)))
    through = _client_refusal(lambda: call(triton_grpc.InferenceServerClient(gateway.address)))
    assert through[0] == direct[0], f"Triton: {direct}\ngateway: {through}"
    assert direct[1] in through[1], f"Triton: {direct[1]!r}\ngateway: {through[1]!r}"


# -- errors Triton reports over the gateway's upstream stream --------------------------------------

def _sequence_without_id(r):
    pass  # accumulate_sequence needs a sequence id; Triton's sequence batcher refuses the request


FORWARDED = {
    # Sequence models ride the stream whatever `upstream.transport` says.
    "sequence without an id": ("accumulate_sequence", _sequence_without_id),
}


@pytest.mark.parametrize("case", sorted(FORWARDED))
def test_triton_errors_over_the_upstream_stream_keep_their_status(triton, gateway, case):
    """These requests pass the gateway's checks and reach Triton over the shared ModelStreamInfer
    stream, whose errors carry no status: the gateway reads it back from Triton's wording."""
    request = _spoiled(FORWARDED[case], request_id="client-7")
    direct = _unary(triton.grpc_address, request)
    before = forwarded(gateway)
    through = _unary(gateway.address, request)
    assert forwarded(gateway) > before, "the gateway refused it itself: the case does not test the stream"
    assert direct[0] == "INVALID_ARGUMENT"
    assert through == direct
    # Over a client's stream, the error message is Triton's too, quoting the client's request id.
    assert _stream(gateway.address, request) == _stream(triton.grpc_address, request)


def test_stream_error_status_comes_from_tritons_wording_only():
    from gateway.errors import BackendError, Unavailable
    from gateway.upstream.stream import stream_error

    full = stream_error("[request id: 41] Exceeds maximum queue size", "41", "", "b:1")
    assert isinstance(full, Unavailable) and "[request id: <id_unknown>] Exceeds maximum queue size" in full.message
    unknown = stream_error("Request for unknown model: 'm' version 3 is not found", "41", "c", "b:1")
    assert isinstance(unknown, BackendError) and unknown.code == grpc.StatusCode.NOT_FOUND
    # A model's own message carries no status over a stream (fail_on_demand's MODE 2 is
    # INVALID_ARGUMENT on Triton's unary path): it stays INTERNAL rather than be guessed.
    own = stream_error("fail_on_demand: MODE 2 asked for INVALID_ARG", "41", "c", "b:1")
    assert own.code == grpc.StatusCode.INTERNAL and own.message == "fail_on_demand: MODE 2 asked for INVALID_ARG"


# -- Triton's own tooling -------------------------------------------------------------------------

def test_tritons_health_metadata_example_passes(gateway):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE_CLIENT), "-u", gateway.address, "-m", "add_sub"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS" in result.stdout


def test_server_name_is_configured_and_the_gateway_still_says_what_it_is(tritons):
    config = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": [tritons[0].grpc_address]}},
              "server": {"name": "inference-gateway"}}
    with GatewayThread(config) as thread:
        metadata = triton_grpc.InferenceServerClient(thread.address).get_server_metadata()
    assert metadata.name == "inference-gateway"
    assert "tensorgate" in metadata.extensions
    with pytest.raises(ConfigError, match="server.name"):
        config_from_mapping({**config, "server": {"name": " "}})
