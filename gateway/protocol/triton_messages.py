"""Triton's wording for the errors it defines, each with the gRPC status Triton answers it with.

Stock clients and Triton's own tooling match on these messages (Triton's example
`simple_grpc_health_metadata.py` looks for "Request for unknown model"), so the gateway words the
refusals it makes itself the same way (gateway/pipeline/validation.py, gateway/upstream/catalog.py)
and adds its own guidance only after Triton's text. The same table gives back the status of an
error that arrives over a ModelStreamInfer stream, where Triton sends the message without a code
(gateway/upstream/stream.py): a message that matches none of them stays INTERNAL, as does any
error a model words itself (`pb_utils.TritonError("…", INVALID_ARG)` reaches a stream as its text
alone).

The wording is Triton 2.51's (the `nvidia-pytriton` 0.7.0 wheel), from its sources
(triton-inference-server/core `src/infer_request.cc`, server `src/grpc/infer_handler.cc`) and
checked against a real server by tests/test_triton_wording.py. Triton writes `[request id: ID] `
(`<id_unknown>` for an empty id) before the messages marked `prefixed`.
"""

from __future__ import annotations

import re
import string

import grpc

from gateway.errors import shown

_REQUEST_ID = re.compile(r"\[request id: [^\]]*\] ")


def request_prefix(request_id: str) -> str:
    """What Triton writes before a request's validation errors (its `LogRequest()`)."""
    return f"[request id: {request_id or '<id_unknown>'}] "


class TritonMessage:
    """One error message as Triton words it: `format(**fields)` writes it, `matches(text)` knows it."""

    __slots__ = ("name", "code", "template", "prefixed", "_pattern")

    def __init__(self, name: str, code: grpc.StatusCode, template: str, prefixed: bool = False) -> None:
        self.name = name
        self.code = code
        self.template = template
        self.prefixed = prefixed
        # The template's literal text, fields as "anything": Triton's messages start with it.
        parts = []
        for literal, field, _, _ in string.Formatter().parse(template):
            parts.append(re.escape(literal))
            if field is not None:
                parts.append(".*?")
        self._pattern = re.compile("".join(parts), re.DOTALL)

    def __repr__(self) -> str:
        return f"<TritonMessage {self.name} {self.code.name}>"

    def format(self, request_id: str = "", **fields) -> str:
        # Names and ids come from the client: quoted whole up to a bound, never a megabyte back.
        text = self.template.format(**{key: shown(value) if isinstance(value, str) else value
                                       for key, value in fields.items()})
        return request_prefix(shown(request_id)) + text if self.prefixed else text

    def matches(self, text: str) -> bool:
        if self.prefixed:
            prefix = _REQUEST_ID.match(text)
            if prefix is not None:
                text = text[prefix.end():]
        return self._pattern.match(text) is not None


_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_M = TritonMessage

# -- model and version (Triton's model repository, gRPC front end) --------------------------------
UNKNOWN_MODEL = _M("unknown model", grpc.StatusCode.NOT_FOUND, "Request for unknown model: '{model}' is not found")
UNKNOWN_VERSION = _M(
    "unknown version", grpc.StatusCode.NOT_FOUND, "Request for unknown model: '{model}' version {version} is not found"
)
NO_VERSIONS = _M(
    "no available versions", grpc.StatusCode.NOT_FOUND, "Request for unknown model: '{model}' has no available versions"
)
VERSION_NOT_READY = _M(
    "version not ready", grpc.StatusCode.UNAVAILABLE,
    "Request for unknown model: '{model}' version {version} is not at ready state",
)
VERSION_NOT_A_NUMBER = _M(
    "version not a number", _INVALID,
    "failed to get model version from specified version string '{version}' (details: stol), "
    "version should be an integral value > 0",
)
VERSION_NEGATIVE = _M(
    "negative version", _INVALID,
    "invalid model version specified '{version}' , version should be an integral value > 0",
)
DECOUPLED_UNARY = _M(
    "decoupled model over ModelInfer", grpc.StatusCode.UNIMPLEMENTED,
    "ModelInfer RPC doesn't support models with decoupled transaction policy",
)
STATISTICS_UNKNOWN_MODEL = _M(
    "statistics of an unknown model", _INVALID, "requested model '{model}' is not available"
)
STATISTICS_UNKNOWN_VERSION = _M(
    "statistics of an unknown version", _INVALID, "requested model version is not available for model '{model}'"
)

# -- a request's tensors: the gRPC front end, in request order ------------------------------------
DUPLICATE_INPUT = _M("input given twice", _INVALID, "input '{name}' already exists in request", prefixed=True)
NO_DATA = _M(
    "input without data", _INVALID, "unable to find data for input tensor '{name}' for model '{model}' in request."
)
CONTENTS_AND_RAW = _M(
    "contents beside raw_input_contents", _INVALID,
    "contents field must not be specified when using raw_input_contents for '{name}' for model '{model}'",
)
TYPED_FIELD = _M(
    "typed contents of another type", _INVALID,
    "unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type '{got}', "
    "expected datatype '{expected}'",
)
TYPED_TWICE = _M(
    "two typed contents fields", _INVALID,
    "unexpected explicit tensor data for input tensor '{name}' for model '{model}', binary data was already supplied.",
)

# -- a request's tensors: Triton's core (InferenceRequest::Normalize) ------------------------------
UNKNOWN_OUTPUT = _M("unknown output", _INVALID, "unexpected inference output '{name}' for model '{model}'")
INPUT_COUNT = _M(
    "input count", _INVALID,
    "expected {expected} inputs but got {got} inputs for model '{model}'. Got input(s) {given}, "
    "but missing required input(s) {missing}. Please provide all required input(s).",
    prefixed=True,
)
INPUT_COUNT_RANGE = _M(
    "input count (optional inputs)", _INVALID,
    "expected number of inputs between {required} and {total} but got {got} inputs for model '{model}'. "
    "Got input(s) {given}, but missing required input(s) {missing}. Please provide all required input(s).",
    prefixed=True,
)
UNKNOWN_INPUT = _M("unknown input", _INVALID, "unexpected inference input '{name}' for model '{model}'")
NO_SHAPE = _M(
    "input without a batch dimension", _INVALID,
    "input '{name}' has no shape but model requires batch dimension for '{model}'", prefixed=True,
)
BATCH_MISMATCH = _M(
    "batch sizes differ", _INVALID, "input '{name}' batch size does not match other inputs for '{model}'", prefixed=True
)
BATCH_TOO_LARGE = _M(
    "batch too large", _INVALID, "inference request batch-size must be <= {max_batch_size} for '{model}'",
    prefixed=True,
)
DATATYPE = _M(
    "wrong datatype", _INVALID,
    "inference input '{name}' data-type is '{got}', but model '{model}' expects '{expected}'", prefixed=True,
)
WILDCARD_IN_REQUEST = _M(
    "-1 in a request's shape", _INVALID,
    "All input dimensions should be specified for input '{name}' for model '{model}', got {got}", prefixed=True,
)
#: Triton adds `BATCH_NOTE` after "got [..]. " for a model with max_batch_size > 0 (else nothing).
SHAPE = _M(
    "wrong shape", _INVALID, "unexpected shape for input '{name}' for model '{model}'. Expected {expected}, got {got}. ",
    prefixed=True,
)
BATCH_NOTE = (
    "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended "
    "to each input shape. If you want to specify the full shape including the batch dim in your input dims "
    "config, try setting max_batch_size to zero. See the model configuration docs for more info on "
    "max_batch_size."
)
BYTE_SIZE = _M(
    "byte size", _INVALID, "input byte size mismatch for input '{name}' for model '{model}'. Expected {expected}, got {got}",
    prefixed=True,
)
STRING_COUNT_OVER = _M(
    "too many BYTES elements", _INVALID,
    "unexpected number of string elements {got} for inference input '{name}' for model '{model}', expecting {expected}",
    prefixed=True,
)
STRING_COUNT_UNDER = _M(
    "too few BYTES elements", _INVALID,
    "expected {expected} string elements for inference input '{name}' for model '{model}', got {got}", prefixed=True,
)
STRING_LENGTH_CUT = _M(
    "BYTES length cut short", _INVALID,
    "incomplete string length indicator for inference input '{name}' for model '{model}', expecting 4 bytes but "
    "only {got} bytes available. Please make sure the string length indicator is in one buffer.",
    prefixed=True,
)
#: Written by the backend (Python backend included) when it reads the tensor, not by the core.
STRING_DATA_CUT = _M(
    "BYTES element cut short", _INVALID,
    "incomplete string data for inference input '{name}', expecting string of length {expected} but only "
    "{got} bytes available",
)

# -- request parameters and sequences -------------------------------------------------------------
RESERVED_PARAMETER = _M(
    "reserved parameter", _INVALID, "parameter keys starting with 'triton_' are reserved for Triton usage"
)
PARAMETER_TYPE = _M(
    "parameter type", _INVALID, "invalid value type for '{name}' parameter, expected {expected}"
)
NEGATIVE_PARAMETER = _M("negative parameter", _INVALID, "invalid value for '{name}' parameter, expected >= 0")
NEGATIVE_PRIORITY = _M("negative priority", _INVALID, "invalid value for 'priority', expected value >= 0.")
NO_CORRELATION_ID = _M(
    "sequence without an id", _INVALID,
    "inference request to model '{model}' must specify a non-zero or non-empty correlation ID",
)
SEQUENCE_NOT_STARTED = _M(
    "sequence step before its start", _INVALID,
    "inference request for sequence {sequence} to model '{model}' must specify the START flag on the first "
    "request of the sequence",
)
#: Triton answers this one UNIMPLEMENTED; the gateway refuses it first, as the bad argument it is.
LONG_CORRELATION_ID = _M("correlation id too long", _INVALID,
                         "string correlation ID cannot be longer than {limit} characters")

# -- refused for load, not for the request: worth another backend (the unary path's UNAVAILABLE) --
QUEUE_FULL = _M("queue full", grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size", prefixed=True)
QUEUE_TIMEOUT = _M("timeout in the queue", grpc.StatusCode.UNAVAILABLE, "Request timeout expired")
SERVER_STOPPING = _M(
    "server stopping", grpc.StatusCode.UNAVAILABLE,
    "Server is stopping, scheduler for model has stopped accepting new inference requests", prefixed=True,
)

#: Every message above, in the order `status_of` tries them.
MESSAGES: tuple[TritonMessage, ...] = tuple(value for value in list(globals().values()) if isinstance(value, TritonMessage))


def status_of(text: str) -> grpc.StatusCode | None:
    """The status Triton answers the error `text` with, when its wording says; else None."""
    for message in MESSAGES:
        if message.matches(text):
            return message.code
    return None
