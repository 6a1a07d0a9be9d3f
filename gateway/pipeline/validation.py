"""Checks one ModelInferRequest against the model's signature before anything is forwarded.

Every failure is an InvalidArgument whose message names the tensor, what was wrong and what was
expected, so one bad request is rejected alone and never reaches a backend or a batch.
"""

from __future__ import annotations

from math import prod

from gateway.errors import InvalidArgument, Unimplemented
from gateway.ext import bytes_element_count
from gateway.protocol.tensors import (
    ALL_CONTENTS_FIELDS,
    CONTENTS_FIELD,
    ELEMENT_BYTES,
    SHARED_MEMORY_PARAMETERS,
    ModelSignature,
    TensorSpec,
)


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate_request(request, signature: ModelSignature) -> None:
    """Raise InvalidArgument (or Unimplemented for shared memory) if `request` cannot be served."""
    model = signature.name
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"model '{model}': {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "expected one raw buffer per input, or none"
        )
    seen: set[str] = set()
    batch = None
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = signature.inputs.get(name)
        if spec is None:
            expected = ", ".join(sorted(signature.inputs)) or "none"
            raise InvalidArgument(f"unexpected inference input '{name}' for model '{model}'; expected: {expected}")
        if name in seen:
            raise InvalidArgument(f"input '{name}' of model '{model}' is given twice")
        seen.add(name)
        for key in SHARED_MEMORY_PARAMETERS:
            if key in tensor.parameters:
                raise Unimplemented(
                    f"input '{name}': shared-memory tensors cannot cross the gateway (it runs on another "
                    "host than the backends); send the tensor contents in the request"
                )
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{name}' of model '{model}' has datatype {tensor.datatype or '(none)'}; expected {spec.datatype}"
            )
        shape = tuple(tensor.shape)
        batch = _check_shape(model, name, shape, spec, signature.max_batch_size, batch)
        elements = prod(shape)
        if raw:
            _check_raw(model, name, spec.datatype, raw[index], elements)
        else:
            _check_typed(model, name, spec.datatype, tensor, elements)
    missing = [s.name for s in signature.inputs.values() if not s.optional and s.name not in seen]
    if missing:
        raise InvalidArgument(
            f"model '{model}' expects {len(signature.inputs)} inputs, missing: {', '.join(missing)}"
        )
    for output in request.outputs:
        if output.name not in signature.outputs:
            expected = ", ".join(sorted(signature.outputs))
            raise InvalidArgument(f"unexpected inference output '{output.name}' for model '{model}'; expected: {expected}")
        for key in SHARED_MEMORY_PARAMETERS:
            if key in output.parameters:
                raise Unimplemented(
                    f"output '{output.name}': shared-memory outputs cannot cross the gateway; "
                    "omit the shared-memory parameters to receive the output in the response"
                )


def _check_shape(model, name, shape, spec: TensorSpec, max_batch_size: int, batch):
    expected = spec.shape
    if len(shape) != len(expected) or any(e != -1 and d != e for d, e in zip(shape, expected)):
        raise InvalidArgument(
            f"input '{name}' of model '{model}' has shape {_shape_text(shape)}; expected {_shape_text(expected)}"
            + (f" (first dimension is the batch, 1..{max_batch_size})" if max_batch_size > 0 else "")
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}' of model '{model}' has a negative dimension in {_shape_text(shape)}")
    if max_batch_size > 0:
        rows = shape[0]
        if not 1 <= rows <= max_batch_size:
            raise InvalidArgument(
                f"input '{name}' of model '{model}' has batch size {rows}; expected 1 to {max_batch_size}"
            )
        if batch is not None and rows != batch:
            raise InvalidArgument(
                f"input '{name}' of model '{model}' has batch size {rows}, other inputs have {batch}; "
                "expected the same batch size for every input"
            )
        return rows
    return batch


def _check_raw(model, name, datatype, data: bytes, elements: int) -> None:
    if datatype == "BYTES":
        count = bytes_element_count(data)
        if count < 0:
            raise InvalidArgument(
                f"input '{name}' of model '{model}': BYTES contents are corrupt (an element's 4-byte length "
                "runs past the end of the buffer)"
            )
        if count != elements:
            raise InvalidArgument(
                f"input '{name}' of model '{model}' holds {count} BYTES elements; expected {elements} for its shape"
            )
        return
    expected = elements * ELEMENT_BYTES[datatype]
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{name}' of model '{model}' has {len(data)} bytes of raw contents; expected {expected} "
            f"({elements} elements of {datatype})"
        )


def _check_typed(model, name, datatype, tensor, elements: int) -> None:
    contents = tensor.contents
    expected_field = CONTENTS_FIELD.get(datatype)
    for field in ALL_CONTENTS_FIELDS:
        if field != expected_field and len(getattr(contents, field)):
            raise InvalidArgument(
                f"input '{name}' of model '{model}' ({datatype}) carries {field}; expected "
                + (expected_field if expected_field else "raw_input_contents (no typed field exists for it)")
            )
    if expected_field is None:
        raise InvalidArgument(
            f"input '{name}' of model '{model}' has no data; {datatype} must be sent in raw_input_contents"
        )
    count = len(getattr(contents, expected_field))
    if count != elements:
        raise InvalidArgument(
            f"input '{name}' of model '{model}' has {count} values in {expected_field}; expected {elements} "
            f"for shape {_shape_text(tensor.shape)}"
        )
