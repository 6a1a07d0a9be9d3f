"""Checks one ModelInferRequest against the model's signature before anything is forwarded.

Every failure is an InvalidArgument in Triton's words for the same request (clients match on them),
followed where it helps by what was expected, so one bad request is rejected alone and never
reaches a backend or a batch.
"""

from __future__ import annotations

from math import prod

from gateway.errors import InvalidArgument, Unimplemented, shown
from gateway.ext import bytes_element_count
from gateway.protocol import triton_messages as triton
from gateway.protocol.tensors import (
    CONTENTS_FIELD,
    ELEMENT_BYTES,
    SHARED_MEMORY_PARAMETERS,
    ModelSignature,
)


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _with_guidance(triton_text: str, guidance: str) -> str:
    """Triton's wording first (clients match on it), then what the gateway adds to help."""
    if triton_text.endswith("."):
        return f"{triton_text} {guidance[0].upper()}{guidance[1:]}."
    return f"{triton_text}; {guidance}"


def validate_request(request, signature: ModelSignature) -> None:
    """Raise InvalidArgument (or Unimplemented for shared memory) if `request` cannot be served.

    The checks run in the order Triton 2.51 runs them, so a request with several faults is refused
    for the one Triton would name, in Triton's words (gateway/protocol/triton_messages.py): first
    its gRPC front end (inputs named once, each with its data, typed contents of the declared type),
    then its core (outputs, input count, names and batch size, then datatype, shape and byte size
    of each input, walking inputs in the reverse of request order as Triton's map does).
    """
    model = signature.name
    if len(request.parameters):
        check_parameters(request.parameters)
    inputs = list(request.inputs)  # iterating a protobuf repeated field costs more than a list
    raw = request.raw_input_contents
    outputs = list(request.outputs) if len(request.outputs) else ()
    _check_front_end(request, model, inputs, outputs, raw)
    for output in outputs:
        if output.name not in signature.outputs:
            unknown = min(o.name for o in outputs if o.name not in signature.outputs)  # Triton's set
            raise InvalidArgument(_with_guidance(
                triton.UNKNOWN_OUTPUT.format(name=unknown, model=model),
                "expected one of: " + ", ".join(signature.outputs),
            ))
    if len(inputs) != len(signature.inputs):
        _check_input_count(request, inputs, signature)
    batch = _check_names_and_batch(request, inputs, signature)
    for index in range(len(inputs) - 1, -1, -1):
        _check_tensor(request, signature, inputs[index], raw[index] if raw else None, batch)


#: The parameters Triton reads itself, with the value kinds it accepts and how it says so.
PARAMETER_KINDS = {
    "sequence_id": (("int64_param", "string_param"), "int64_param or string_param."),
    "sequence_start": (("bool_param",), "bool_param."),
    "sequence_end": (("bool_param",), "bool_param."),
    "priority": (("int64_param", "uint64_param"), "int64_param or uint64_param."),
    "timeout": (("int64_param",), "int64_param."),
    "triton_enable_empty_final_response": (("bool_param",), "bool_param."),
}
#: Triton's longest string sequence id.
MAX_CORRELATION_ID_CHARS = 128
#: The one `triton_` parameter a client may send.
CLIENT_TRITON_PARAMETERS = ("triton_enable_empty_final_response",)
#: What any other request parameter may hold (Triton's core has no unsigned or empty parameter).
OTHER_PARAMETER_KINDS = (("int64_param", "bool_param", "string_param", "double_param"),
                         "int64_param, bool_param, or string_param.")
#: Output parameters Triton reads, with their kinds.
OUTPUT_PARAMETER_KINDS = {"classification": (("int64_param",), "int64_param")}


def check_parameters(parameters) -> None:
    """Triton's gRPC front end refuses reserved keys and parameters of a kind it cannot take (its own
    of the wrong kind; any of an unsigned or no kind; a negative priority); the gateway refuses them
    first, in Triton's words, so no upstream transport turns them into another status (Triton's
    HTTP endpoint answered several as INTERNAL)."""
    for key in parameters:
        if "\0" in key:
            # Triton's core reads keys as C strings: its HTTP endpoint answered INTERNAL ("parameter
            # key 'sequ' was not found"), its gRPC endpoint would take another key than the one sent.
            raise InvalidArgument(f"parameter key {shown(key)!r} holds a NUL character; expected a key without one")
        value = parameters[key]
        kind = value.WhichOneof("parameter_choice")
        kinds = PARAMETER_KINDS.get(key)
        if kinds is not None:
            if kind not in kinds[0]:
                raise InvalidArgument(triton.PARAMETER_TYPE.format(name=key, expected=kinds[1]))
            if key == "priority" and kind == "int64_param" and value.int64_param < 0:
                raise InvalidArgument(triton.NEGATIVE_PRIORITY.format())
            if (key == "sequence_id" and kind == "string_param"
                    and len(value.string_param.encode()) > MAX_CORRELATION_ID_CHARS):  # Triton counts bytes
                raise InvalidArgument(triton.LONG_CORRELATION_ID.format(limit=MAX_CORRELATION_ID_CHARS))
        elif key.startswith("triton_"):
            raise InvalidArgument(
                triton.RESERVED_PARAMETER.format()
                + ". Only the following keys starting with 'triton_' are allowed: " + ", ".join(CLIENT_TRITON_PARAMETERS)
            )
        elif kind not in OTHER_PARAMETER_KINDS[0]:
            raise InvalidArgument(triton.PARAMETER_TYPE.format(name=key, expected=OTHER_PARAMETER_KINDS[1]))


def _check_front_end(request, model: str, inputs: list, outputs, raw) -> None:
    """What Triton's gRPC front end refuses before its core sees the request."""
    if len(inputs) > 1 and len({tensor.name for tensor in inputs}) != len(inputs):
        seen: set[str] = set()
        for tensor in inputs:
            if tensor.name in seen:
                raise InvalidArgument(triton.DUPLICATE_INPUT.format(request.id, name=tensor.name))
            seen.add(tensor.name)
    for index, tensor in enumerate(inputs):
        name = tensor.name
        for key in SHARED_MEMORY_PARAMETERS if len(tensor.parameters) else ():
            if key in tensor.parameters:
                raise Unimplemented(
                    f"input '{name}': shared-memory tensors cannot cross the gateway (it runs on another "
                    "host than the backends); send the tensor contents in the request"
                )
        if tensor.HasField("contents"):
            if raw:
                raise InvalidArgument(triton.CONTENTS_AND_RAW.format(name=name, model=model))
            _check_typed_fields(model, tensor)
        elif index >= len(raw):
            raise InvalidArgument(_with_guidance(
                triton.NO_DATA.format(name=name, model=model),
                "expected one raw_input_contents entry per input, or typed contents in each input",
            ))
    for output in outputs:
        for key, (kinds, expected) in OUTPUT_PARAMETER_KINDS.items() if len(output.parameters) else ():
            if key in output.parameters:
                value = output.parameters[key]
                if value.WhichOneof("parameter_choice") not in kinds:
                    raise InvalidArgument(triton.PARAMETER_TYPE.format(name=key, expected=expected))
                if value.int64_param < 0:
                    raise InvalidArgument(triton.NEGATIVE_PARAMETER.format(name=key))
        for key in SHARED_MEMORY_PARAMETERS if len(output.parameters) else ():
            if key in output.parameters:
                raise Unimplemented(
                    f"output '{output.name}': shared-memory outputs cannot cross the gateway; "
                    "omit the shared-memory parameters to receive the output in the response"
                )
    if raw and len(raw) != len(inputs):  # Triton ignores extra buffers; a batch cannot
        raise InvalidArgument(
            f"model '{model}': {len(raw)} raw_input_contents for {len(inputs)} inputs; "
            "expected one raw buffer per input, or none"
        )


#: InferTensorContents fields in the order Triton reads them, with the type each one carries.
_TYPED_FIELDS = (
    ("bool_contents", lambda declared: "BOOL"),
    ("int_contents", lambda declared: declared if declared in ("INT8", "INT16") else "INT32"),
    ("int64_contents", lambda declared: "INT64"),
    ("uint_contents", lambda declared: declared if declared in ("UINT8", "UINT16") else "UINT32"),
    ("uint64_contents", lambda declared: "UINT64"),
    ("fp32_contents", lambda declared: "FP32"),
    ("fp64_contents", lambda declared: "FP64"),
    ("bytes_contents", lambda declared: "BYTES"),
)


def _protocol_datatype(datatype: str) -> str:
    """A datatype as Triton names it back: itself, or '<invalid>' for one KServe v2 does not have."""
    return datatype if datatype in ELEMENT_BYTES or datatype == "BYTES" else "<invalid>"


def _check_typed_fields(model: str, tensor) -> None:
    declared = tensor.datatype
    contents = tensor.contents
    supplied = False
    for field, carried in _TYPED_FIELDS:
        if not len(getattr(contents, field)):
            continue
        if supplied:
            raise InvalidArgument(triton.TYPED_TWICE.format(name=tensor.name, model=model))
        if carried(declared) != declared:
            raise InvalidArgument(triton.TYPED_FIELD.format(
                name=tensor.name, model=model, got=carried(declared), expected=_protocol_datatype(declared)
            ))
        supplied = True


def _check_input_count(request, inputs: list, signature: ModelSignature) -> None:
    given = len(inputs)
    total = len(signature.inputs)
    required = [spec.name for spec in signature.inputs.values() if not spec.optional]
    if given <= total and given >= len(required):
        return
    names = {tensor.name for tensor in inputs}
    # Written as Triton writes them, its "]" for an empty missing list included.
    missing = ("[" + "".join(f"'{name}'," for name in required if name not in names))[:-1] + "]"
    listed = "[" + ",".join(f"'{tensor.name}'" for tensor in reversed(inputs)) + "]"
    fields = dict(got=given, model=signature.name, given=listed, missing=missing)
    if total == len(required):
        text = triton.INPUT_COUNT.format(request.id, expected=total, **fields)
    else:
        text = triton.INPUT_COUNT_RANGE.format(request.id, required=len(required), total=total, **fields)
    optional = [spec.name for spec in signature.inputs.values() if spec.optional]
    raise InvalidArgument(_with_guidance(
        text, "expected inputs: " + ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
    ))


def _check_names_and_batch(request, inputs: list, signature: ModelSignature) -> int | None:
    """Every input is the model's; with max_batch_size > 0, all share one batch size (returned)."""
    model = signature.name
    batching = signature.max_batch_size > 0
    batch = None
    for tensor in reversed(inputs):
        if tensor.name not in signature.inputs:
            raise InvalidArgument(_with_guidance(
                triton.UNKNOWN_INPUT.format(name=tensor.name, model=model),
                "expected one of: " + ", ".join(signature.inputs),
            ))
        if not batching:
            continue
        if not tensor.shape:
            raise InvalidArgument(triton.NO_SHAPE.format(request.id, name=tensor.name, model=model))
        if batch is None:
            batch = tensor.shape[0]
        elif tensor.shape[0] != batch:
            raise InvalidArgument(triton.BATCH_MISMATCH.format(request.id, name=tensor.name, model=model))
    if batching and batch is not None and batch > signature.max_batch_size:
        raise InvalidArgument(
            triton.BATCH_TOO_LARGE.format(request.id, max_batch_size=signature.max_batch_size, model=model)
        )
    return batch


def _check_tensor(request, signature: ModelSignature, tensor, data: bytes | None, batch: int | None) -> None:
    """Datatype, shape and size of one input, as Triton checks them once the batch size is known."""
    model = signature.name
    name = tensor.name
    spec = signature.inputs[name]
    if tensor.datatype != spec.datatype:
        got = _protocol_datatype(tensor.datatype)
        text = triton.DATATYPE.format(request.id, name=name, got=got, model=model, expected=spec.datatype)
        if got == "<invalid>":
            text = _with_guidance(text, f"'{tensor.datatype}' is not a KServe v2 datatype")
        raise InvalidArgument(text)
    shape = tuple(tensor.shape)
    batching = signature.max_batch_size > 0
    dims, expected = (shape[1:], spec.shape[1:]) if batching else (shape, spec.shape)
    mismatch = len(dims) != len(expected)
    negative = False
    if not mismatch:
        for got, wanted in zip(dims, expected):
            if got < 0:
                if got == -1:
                    raise InvalidArgument(
                        triton.WILDCARD_IN_REQUEST.format(request.id, name=name, model=model, got=_shape_text(shape))
                    )
                negative = True
            if wanted != -1 and got != wanted:
                mismatch = True
                break
    if mismatch:
        text = triton.SHAPE.format(
            request.id, name=name, model=model, expected=_shape_text(spec.shape), got=_shape_text(shape)
        )
        raise InvalidArgument(text + (triton.BATCH_NOTE if batching else ""))
    # Triton would go on with a batch of 0 or a negative dimension and fail obscurely; the gateway says why.
    if batching and batch < 1:
        raise InvalidArgument(
            f"input '{name}' of model '{model}' has batch size {batch}; expected 1 to {signature.max_batch_size}"
        )
    if negative:
        raise InvalidArgument(f"input '{name}' of model '{model}' has a negative dimension in {_shape_text(shape)}")
    elements = prod(shape)
    if spec.datatype == "BYTES":
        if data is not None:
            _check_bytes_buffer(request, model, name, data, elements)
        else:
            _check_string_count(request, model, name, len(tensor.contents.bytes_contents), elements)
        return
    element_bytes = ELEMENT_BYTES[spec.datatype]
    if data is not None:
        size = len(data)
    else:  # typed contents (FP16 and BF16 have no typed field: Triton counts 0 bytes)
        field = CONTENTS_FIELD.get(spec.datatype)
        size = len(getattr(tensor.contents, field)) * element_bytes if field else 0
    if size != elements * element_bytes:
        raise InvalidArgument(_with_guidance(
            triton.BYTE_SIZE.format(request.id, name=name, model=model, expected=elements * element_bytes, got=size),
            f"expected {elements} elements of {spec.datatype} for shape {_shape_text(shape)}",
        ))


def _check_string_count(request, model: str, name: str, count: int, elements: int) -> None:
    if count > elements:  # Triton stops counting at the first element too many
        raise InvalidArgument(triton.STRING_COUNT_OVER.format(
            request.id, got=elements + 1, name=name, model=model, expected=elements
        ))
    if count < elements:
        raise InvalidArgument(triton.STRING_COUNT_UNDER.format(
            request.id, expected=elements, name=name, model=model, got=count
        ))


def _check_bytes_buffer(request, model: str, name: str, data: bytes, elements: int) -> None:
    if bytes_element_count(data) == elements:  # the compiled walk; the rest only runs for a bad buffer
        return
    # Walk it as Triton's core does, then as the backend that reads it does.
    count, position, cut_short = 0, 0, None
    while position < len(data):
        if len(data) - position < 4:
            raise InvalidArgument(triton.STRING_LENGTH_CUT.format(
                request.id, name=name, model=model, got=len(data) - position
            ))
        length = int.from_bytes(data[position:position + 4], "little")
        position += 4
        count += 1
        if count > elements:
            break
        if length > len(data) - position and cut_short is None:
            cut_short = (length, len(data) - position)
        position = min(len(data), position + length)
    _check_string_count(request, model, name, count, elements)
    if cut_short is not None:
        raise InvalidArgument(triton.STRING_DATA_CUT.format(name=name, expected=cut_short[0], got=cut_short[1]))
    raise InvalidArgument(f"input '{name}' of model '{model}': BYTES contents are corrupt")  # not reached
