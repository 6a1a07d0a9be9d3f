"""Triton's HTTP/REST inference protocol with the binary tensor data extension, to and from protobuf.

    POST /v2/models/<model>[/versions/<version>]/infer HTTP/1.1
    Inference-Header-Content-Length: <bytes of the JSON header>
    Content-Length: <JSON header + every tensor's bytes>

    {"id": …, "inputs": [{"name", "datatype", "shape", "parameters": {"binary_data_size": N, …}}, …],
     "outputs": [{"name", "parameters": {"binary_data": true, …}}], "parameters": {…}}<tensor bytes…>

The answer has the same shape (JSON header, then each output's bytes, in order). Tensor bytes are
the raw contents of the gRPC protocol unchanged, BYTES elements included (4-byte little-endian
length, then the bytes), so `raw_input_contents` go out as they came and `raw_output_contents` are
slices of the answer. Every output is asked for in binary.

Errors: Triton answers an HTTP status and `{"error": "<message>"}`; its HTTP server derives the
status from the same error code its gRPC server turns into a gRPC status (http_server.cc
`HttpCodeFromError`, grpc_utils.cc), so the code is recovered from the status (`STATUS_OF_HTTP`)
and the message is the one a direct gRPC call would get. 400 stands for INVALID_ARG (also for
UNKNOWN, ALREADY_EXISTS and CANCELLED, which Triton does not return for an inference request
that reached it); tests/test_upstream_http.py compares both answers for the same failing requests.
"""

from __future__ import annotations

import asyncio
import json
from typing import Mapping

import grpc

from gateway.errors import BACKEND_UNAVAILABLE, Abandoned, BackendError, GatewayError, InvalidArgument, Unavailable
from gateway.protocol import parameter_value, pb
from gateway.protocol.tensors import raw_of_typed
from gateway.upstream.http import AnswerTooLarge, ConnectionAbandoned, ConnectionFailed, HttpPool

__all__ = ["RestInference", "STATUS_OF_HTTP", "decode_response", "encode_request", "error_of", "infer_target"]

#: Triton's HTTP status → the gRPC status its gRPC endpoint gives for the same error.
STATUS_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def infer_target(model: str, version: str) -> bytes:
    """The request target of an infer call (model names are URL path segments: quoted)."""
    from urllib.parse import quote

    path = f"/v2/models/{quote(model, safe='')}"
    if version:
        path += f"/versions/{quote(version, safe='')}"
    return f"{path}/infer".encode()


# ----------------------------------------------------------------------------- the request


def _parameters(parameters) -> dict:
    return {key: parameter_value(value) for key, value in parameters.items()}


#: Request parameters only Triton's HTTP endpoint reads (binary_data_output), or that it refuses
#: (any `triton_` key; the empty final response is a stream's, and HTTP carries no stream).
HTTP_ONLY_PARAMETERS = ("binary_data_output", "triton_enable_empty_final_response")


class _Templates(dict):
    """A bounded cache of JSON parts, keyed by what they are made of (see encode/decode below).

    Requests of one model nearly always share their layout and answers their header, so the JSON
    is built or parsed once per layout, not once per request (~4 µs each way, RESULTS.md "The REST
    codec"). A gateway sees few layouts; one that sees many (a client varying a dimension each
    time) starts over at `limit` rather than growing."""

    def __init__(self, limit: int = 512) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


_INPUTS_JSON = _Templates()
_NO_PARAMETERS_JSON = b',"parameters":{"binary_data_output":true}}'


def _inputs_json(inputs, blobs) -> bytes:
    header_inputs = []
    for tensor, blob in zip(inputs, blobs):
        parameters = _parameters(tensor.parameters) if tensor.parameters else {}
        parameters["binary_data_size"] = len(blob)
        header_inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                              "parameters": parameters})
    return _dumps(header_inputs).encode()


def _layout_of(inputs, blobs) -> tuple | None:
    """What an inputs header is made of (None: a tensor carries parameters, not cached)."""
    key = []
    for tensor, blob in zip(inputs, blobs):
        if tensor.parameters:
            return None
        key.append((tensor.name, tensor.datatype, tuple(tensor.shape), len(blob)))
    return tuple(key)


def _only_a_timeout(parameters) -> bool:
    """The parameters are one non-negative integer `timeout` (what the dispatcher sets from a deadline)."""
    if len(parameters) != 1 or "timeout" not in parameters:
        return False
    value = parameters["timeout"]
    return value.WhichOneof("parameter_choice") == "int64_param" and value.int64_param >= 0


def encode_request(request) -> tuple[bytes, list[bytes]]:
    """(JSON header, tensor bytes in input order) of a ModelInferRequest.

    Raw contents are forwarded as they are; typed contents (a request that was not batched) are
    converted to raw here, as the batching stage does for the requests it merges. The header's
    `inputs` part is built once per layout (`_INPUTS_JSON`); `id` and `parameters` per request.
    """
    inputs = request.inputs
    blobs = list(request.raw_input_contents)
    if not blobs and inputs:
        blobs = raw_of_typed(request)
    elif len(blobs) != len(inputs):
        raise InvalidArgument(
            f"model '{request.model_name}': the request has {len(inputs)} inputs but {len(blobs)} raw input "
            "contents; expected one raw content per input"
        )
    layout = _layout_of(inputs, blobs)
    if layout is None:
        inputs_json = _inputs_json(inputs, blobs)
    else:
        inputs_json = _INPUTS_JSON.get(layout) or _INPUTS_JSON.keep(layout, _inputs_json(inputs, blobs))
    parts = [b'{"inputs":', inputs_json]
    if request.id:
        parts += (b',"id":', _dumps(request.id).encode())
    if request.outputs:
        outputs = []
        for output in request.outputs:
            output_parameters = _parameters(output.parameters) if output.parameters else {}
            output_parameters["binary_data"] = True
            outputs.append({"name": output.name, "parameters": output_parameters})
        parts += (b',"outputs":', _dumps(outputs).encode())
    parameters = request.parameters
    if not request.outputs and (not parameters or _only_a_timeout(parameters)):
        # The usual two: no parameters, or only the deadline the dispatcher set (Triton's `timeout`, µs).
        parts.append(_NO_PARAMETERS_JSON if not parameters else
                     b',"parameters":{"timeout":%d,"binary_data_output":true}}' % parameters["timeout"].int64_param)
    else:
        parameters = _parameters(parameters) if parameters else {}
        # Keys that steer Triton's HTTP endpoint and mean nothing over gRPC: the gateway sets what it
        # needs (binary outputs); a client's own would change the answer's form or be refused.
        for key in HTTP_ONLY_PARAMETERS:
            parameters.pop(key, None)
        timeout = parameters.get("timeout")
        if type(timeout) is int and timeout < 0:
            # Triton's gRPC endpoint reads a negative timeout as unsigned (no timeout to speak of); its
            # HTTP endpoint refuses it as INTERNAL. Sent as gRPC would mean it: no timeout.
            del parameters["timeout"]
        if not request.outputs:
            parameters["binary_data_output"] = True
        parts += (b',"parameters":', _dumps(parameters).encode(), b"}")
    return b"".join(parts), blobs


# ----------------------------------------------------------------------------- the answer


def _set_parameter(target, value) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value < 0 or value < 1 << 63:
            target.int64_param = value
        else:
            target.uint64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value if isinstance(value, str) else _dumps(value)


_ANSWER_TEMPLATES = _Templates()
_ID_OPENING = b'{"id":"'


def _split_id(head: bytes) -> tuple[str, bytes] | None:
    """(id, the header without it) of an answer header, where Triton puts the id first. ("", header)
    when it does not begin with one (an id elsewhere then stays in the key: right, if cached per id);
    None when the id has escapes (the header is then parsed whole, not cached)."""
    if not head.startswith(_ID_OPENING):
        return "", head
    end = head.find(b'"', 7)
    if end < 0 or head[end + 1:end + 2] != b"," or b"\\" in head[7:end]:
        return None
    return head[7:end].decode("utf-8"), b"{" + head[end + 2:]


def _parse_answer_header(header: bytes | bytearray, backend: str):
    """(ModelInferResponse without tensor bytes, each output's size) from an answer's JSON header."""
    try:
        fields = _loads(header)
        response = pb.ModelInferResponse(model_name=fields["model_name"], model_version=fields.get("model_version", ""),
                                         id=fields.get("id", ""))
        sizes = []
        for output in fields.get("outputs", ()):
            parameters = output.get("parameters") or {}
            size = parameters.get("binary_data_size")
            if size is None:
                raise ValueError(f"output '{output['name']}' came back as JSON data, not binary")
            tensor = response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
            for key, value in parameters.items():
                if key != "binary_data_size":
                    _set_parameter(tensor.parameters[key], value)
            sizes.append((output["name"], size))
        for key, value in (fields.get("parameters") or {}).items():
            _set_parameter(response.parameters[key], value)
    except (ValueError, KeyError, TypeError) as error:
        raise BackendError(grpc.StatusCode.INTERNAL, f"the backend sent an unreadable answer: {error}", backend) from None
    return response, sizes


def decode_response(body: bytes | bytearray, header_length: int, backend: str):
    """The ModelInferResponse of a successful answer (HTTP 200).

    Answers of one model share their header but for the id, so the header is parsed once
    (`_ANSWER_TEMPLATES`: the response without id and tensor bytes, serialized, and the outputs'
    sizes) and each answer is that template, its id and its tensor bytes.

    A large answer's body is a bytearray (http.py), and upb takes only bytes: each output is first
    copied out as bytes, then the body is let go, then upb copies each in — so the answer is held at
    most twice at once, not three times (the caller passes the only reference to `body`).
    """
    head = bytes(body[:header_length]) if header_length >= 0 else None
    split = None if head is None else _split_id(head)
    if split is None:
        response, sizes = _parse_answer_header(body if head is None else head, backend)
    else:
        answer_id, key = split
        template = _ANSWER_TEMPLATES.get(key)
        if template is None:
            response, sizes = _parse_answer_header(key, backend)
            template = _ANSWER_TEMPLATES.keep(key, (response.SerializeToString(), sizes))
        response = pb.ModelInferResponse.FromString(template[0])
        sizes = template[1]
        if answer_id:
            response.id = answer_id
    offset = max(header_length, 0)
    places = []
    for name, size in sizes:
        if offset + size > len(body):
            raise BackendError(grpc.StatusCode.INTERNAL, f"the backend sent an unreadable answer: output '{name}' "
                               f"ends past the answer's {len(body)} bytes", backend)
        places.append((offset, offset + size))
        offset += size
    raw = response.raw_output_contents
    if type(body) is bytes:
        raw.extend([body[start:end] for start, end in places])
    else:
        with memoryview(body) as view:
            outputs = [bytes(view[start:end]) for start, end in places]
        body = None
        while outputs:
            raw.append(outputs.pop(0))  # each output's bytes go as soon as upb holds its copy
    return response


def error_of(status: int, body: bytes, backend: str) -> GatewayError:
    """The error of a failed answer: Triton's message under the gRPC status its gRPC endpoint gives."""
    try:
        message = _loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace") or f"HTTP status {status}"
    code = STATUS_OF_HTTP.get(status, grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the backend is unavailable: {message}", detail=f"backend {backend}")
    return BackendError(code, message, backend)


def headers_of(trace_context: Mapping[str, str] | None) -> bytes:
    """Extra request header lines (e.g. `traceparent`) as bytes."""
    if not trace_context:
        return b""
    return "".join(f"{name}: {value}\r\n" for name, value in trace_context.items()).encode("latin-1")


# ----------------------------------------------------------------------------- the client


class RestInference:
    """ModelInfer over one backend's HTTP endpoint: a ModelInferRequest in, a ModelInferResponse out.

    Failures are GatewayErrors: Triton's own (its status recovered, see the module docstring),
    Unavailable when the backend cannot be reached or a connection broke (the router may retry
    elsewhere), RESOURCE_EXHAUSTED for an answer over `upstream.max_message_bytes`.
    """

    def __init__(self, pool: HttpPool, backend: str) -> None:
        self.pool = pool
        self.backend = backend
        self._targets: dict[tuple[str, str], bytes] = {}
        self.requests = 0
        """Inference requests sent (health checks not counted)."""
        self._request_head = b" HTTP/1.1\r\n" + pool.host_header + (
            b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: ")

    def __repr__(self) -> str:
        return f"<RestInference {self.backend} requests={self.requests} {self.pool!r}>"

    async def infer(self, request, trace_context: Mapping[str, str] | None = None):
        self.requests += 1
        key = (request.model_name, request.model_version)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = infer_target(*key)
        header, blobs = encode_request(request)
        size = len(header)
        for blob in blobs:
            size += len(blob)
        parts = [b"".join((
            b"POST ", target, self._request_head, str(len(header)).encode(), b"\r\nContent-Length: ",
            str(size).encode(), b"\r\n", headers_of(trace_context), b"\r\n", header,
        ))]
        parts += blobs
        blobs = header = None  # `parts` holds the tensor bytes alone: the pool lets them go once answered
        try:
            answer = await self.pool.request(parts)
        except AnswerTooLarge as failure:
            raise BackendError(grpc.StatusCode.RESOURCE_EXHAUSTED, failure.public, self.backend,
                               detail=failure.message) from None
        except ConnectionAbandoned as failure:
            raise Abandoned(failure.message) from None
        except ConnectionFailed as failure:
            raise Unavailable(failure.public or BACKEND_UNAVAILABLE, detail=failure.message) from None
        if answer.status != 200:
            raise error_of(answer.status, answer.body, self.backend)
        return decode_response(answer.take_body(), answer.header_length, self.backend)

    async def ready(self, timeout: float) -> None:
        """Raise Unavailable unless the backend answers `GET /v2/health/ready` with 200 in time."""
        head = b"GET /v2/health/ready HTTP/1.1\r\n" + self.pool.host_header + b"\r\n"
        try:
            answer = await asyncio.wait_for(self.pool.request([head]), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"backend {self.backend}: HTTP endpoint {self.pool.address} did not answer "
                              f"within {timeout:g} s") from None
        except ConnectionFailed as failure:
            raise Unavailable(f"HTTP endpoint: {failure.message}") from None
        if answer.status != 200:
            # Health checks: these messages are the fleet's health detail (GetSnapshot), not a client's.
            raise Unavailable(f"backend {self.backend}: HTTP endpoint {self.pool.address} is not ready "
                              f"(HTTP {answer.status})")
