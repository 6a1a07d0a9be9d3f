"""Checks one ModelInferRequest against the model's signature before anything is forwarded.

Every failure is an InvalidArgument whose message names the tensor, what was wrong and what was
expected, so one bad request is rejected alone and never reaches a backend or a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from gateway.errors import InvalidArgument, Unimplemented
from gateway.ext import bytes_element_count

#: Bytes per element of each fixed-size KServe v2 datatype.
ELEMENT_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1,
    "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4,
    "UINT64": 8, "INT64": 8, "FP64": 8,
}

#: Which InferTensorContents field carries each datatype's typed (non-raw) values.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL_CONTENTS_FIELDS = frozenset(CONTENTS_FIELD.values())

SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """Full shape as the model metadata reports it (batch dimension included, -1 = any)."""
    optional: bool = False


@dataclass(frozen=True)
class ModelSignature:
    """What a model accepts and produces, derived from its metadata and config."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int
    decoupled: bool
    sequence: bool
    sequence_idle_s: float | None

    @classmethod
    def from_backend(cls, metadata, config_response) -> "ModelSignature":
        config = config_response.config
        optional = {tensor.name for tensor in config.input if tensor.optional}

        def specs(tensors):
            return {
                t.name: TensorSpec(t.name, t.datatype, tuple(t.shape), t.name in optional)
                for t in tensors
            }

        idle = None
        if config.HasField("sequence_batching"):
            micros = config.sequence_batching.max_sequence_idle_microseconds
            idle = micros / 1e6 if micros else None
        return cls(
            name=metadata.name,
            version=metadata.versions[-1] if metadata.versions else "",
            inputs=specs(metadata.inputs),
            outputs=specs(metadata.outputs),
            max_batch_size=config.max_batch_size,
            decoupled=config.model_transaction_policy.decoupled,
            sequence=config.HasField("sequence_batching"),
            sequence_idle_s=idle,
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
