"""Merging requests into one batch request, and splitting the batch response back (ext's scatter).

Only requests with the same *batch key* share a batch: the same inputs with the same datatypes and
non-batch dimensions, the same requested outputs, and the same request parameters (other than the
scheduling ones the gateway itself handles). Everything here runs after validation, so tensor sizes
are known to be consistent.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import grpc

from gateway.errors import BackendError
from gateway.ext import scatter, scatter_bytes
from gateway.protocol import pb
from gateway.protocol.tensors import ELEMENT_BYTES

#: Request parameters the gateway consumes itself; they do not split batches.
SCHEDULING_PARAMETERS = frozenset({"priority", "timeout"})


def batch_key(request) -> tuple:
    """What must be equal for two requests to share a batch (hashable)."""
    inputs = tuple(
        (tensor.name, tensor.datatype, tuple(tensor.shape[1:]), _parameters_key(tensor.parameters))
        for tensor in request.inputs
    )
    outputs = tuple((output.name, _parameters_key(output.parameters)) for output in request.outputs)
    parameters = _parameters_key(request.parameters, skip=SCHEDULING_PARAMETERS)
    return tuple(sorted(inputs)), outputs, parameters


def key_bytes(key: tuple) -> int:
    """About how many bytes a batch key holds (its names and serialized parameters)."""
    inputs, outputs, parameters = key
    size = sum(len(name) + len(datatype) + 8 * len(shape) + sum(len(k) + len(v) for k, v in tensor_parameters)
               for name, datatype, shape, tensor_parameters in inputs)
    size += sum(len(name) + sum(len(k) + len(v) for k, v in output_parameters) for name, output_parameters in outputs)
    return size + sum(len(k) + len(v) for k, v in parameters)


def _parameters_key(parameters, skip: frozenset = frozenset()) -> tuple:
    if not parameters:
        return ()
    return tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in parameters.items() if k not in skip))


def merge(requests: Sequence, rows: Sequence[int]):
    """One ModelInferRequest holding `requests` stacked along the batch dimension.

    Every request carries raw contents: the dispatcher converts typed contents per request before
    it queues them (so a bad value fails only its own request). The merged request is the first
    request copied (model, version, inputs with their parameters, requested outputs, parameters
    but the scheduling ones) without its id, typed contents and raw buffers; each input's rows
    become the batch's and its raw buffer the requests' buffers joined (one copy).
    """
    first = requests[0]
    total_rows = sum(rows)
    merged = pb.ModelInferRequest()
    merged.CopyFrom(first)
    merged.ClearField("id")
    merged.ClearField("raw_input_contents")
    parameters = merged.parameters
    if parameters:
        for key in SCHEDULING_PARAMETERS:
            if key in parameters:
                del parameters[key]
    single_input = len(merged.inputs) == 1
    for name_order, tensor in enumerate(merged.inputs):
        tensor.ClearField("contents")
        tensor.shape[0] = total_rows
        if single_input:  # the batch key guarantees every request has just this input
            parts = [request.raw_input_contents[0] for request in requests]
        else:
            name = tensor.name
            parts = []
            for request in requests:
                # Inputs may come in any order; the batch key guarantees the same set.
                index = name_order if request.inputs[name_order].name == name else _index_of(request, name)
                parts.append(request.raw_input_contents[index])
        merged.raw_input_contents.append(b"".join(parts))
    return merged


def _index_of(request, name: str) -> int:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return index
    raise KeyError(name)


def split(response, rows: Sequence[int], backend: str = "") -> list:
    """Split a batch response into one ModelInferResponse per request, by row counts.

    Output slices are zero-copy views of the batch response's bytes until each request's response
    is parsed from its head (model, version, parameters, outputs with its rows: serialized once per
    row count) followed by its slices as raw_output_contents fields — one join (the one copy) and
    one upb parse per request, instead of building each response field by field. A response whose
    outputs do not have the batch's rows is a backend error.
    """
    total_rows = sum(rows)
    raw_outputs = response.raw_output_contents
    if len(raw_outputs) != len(response.outputs):
        raise BackendError(
            grpc.StatusCode.INTERNAL,
            f"model '{response.model_name}': batch response carries {len(raw_outputs)} raw outputs for "
            f"{len(response.outputs)} outputs; expected raw contents for every output",
            backend,
        )
    parts: list[list] = []
    raw_bytes = 0
    for tensor, raw in zip(response.outputs, raw_outputs):
        raw_bytes += len(raw)
        shape = list(tensor.shape)
        if not shape or shape[0] != total_rows:
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                f"model '{response.model_name}': output '{tensor.name}' has shape {shape}; expected "
                f"{total_rows} rows first, one per batched request",
                backend,
            )
        per_row = prod(shape[1:])
        try:
            if tensor.datatype == "BYTES":
                parts.append(scatter_bytes(raw, [r * per_row for r in rows]))
            else:
                parts.append(scatter(raw, rows, per_row * ELEMENT_BYTES[tensor.datatype]))
        except ValueError as error:
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                f"model '{response.model_name}': output '{tensor.name}' cannot be split by rows: {error}",
                backend,
            ) from None
    # Each request's response is parsed from its head (built once per row count) followed by its
    # raw outputs as appended raw_output_contents fields: one join and one upb parse per request.
    skeleton = _response_skeleton(response, raw_bytes)
    heads: dict[int, bytes] = {}
    parse = pb.ModelInferResponse.FromString
    responses = []
    if len(parts) == 1:
        for count, piece in zip(rows, parts[0]):
            head = heads.get(count)
            if head is None:
                head = heads[count] = _response_head(skeleton, count)
            responses.append(parse(b"".join((head, _raw_output_field(len(piece)), piece))))
        return responses
    for index, count in enumerate(rows):
        head = heads.get(count)
        if head is None:
            head = heads[count] = _response_head(skeleton, count)
        wire = [head]
        for pieces in parts:
            piece = pieces[index]
            wire += (_raw_output_field(len(piece)), piece)
        responses.append(parse(b"".join(wire)))
    return responses


#: Below this many bytes of raw outputs, a batch response's skeleton is copied whole and its raw
#: outputs cleared (one upb copy: cheaper than building it field by field); above, it is built.
COPY_SKELETON_BELOW = 64 * 1024


def _response_skeleton(response, raw_bytes: int):
    """The batch response without its id, raw outputs and typed contents: model, version,
    parameters, outputs (names, datatypes, shapes, parameters)."""
    if raw_bytes < COPY_SKELETON_BELOW:
        skeleton = pb.ModelInferResponse()
        skeleton.CopyFrom(response)
        skeleton.ClearField("id")
        skeleton.ClearField("raw_output_contents")
    else:
        skeleton = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        parameters = response.parameters
        for key in parameters:
            skeleton.parameters[key].CopyFrom(parameters[key])
        skeleton.outputs.extend(response.outputs)
    for tensor in skeleton.outputs:
        tensor.ClearField("contents")
    return skeleton


def _response_head(skeleton, count: int) -> bytes:
    """One request's response without its raw outputs, serialized: the skeleton with `count` rows."""
    for tensor in skeleton.outputs:
        tensor.shape[0] = count
    return skeleton.SerializeToString()


_RAW_OUTPUT_TAG = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number << 3 | 2  # length-delimited
_raw_output_fields: dict[int, bytes] = {}


def _raw_output_field(length: int) -> bytes:
    """The tag and length (varint) that put the next `length` bytes into raw_output_contents."""
    field = _raw_output_fields.get(length)
    if field is None:
        encoded = [_RAW_OUTPUT_TAG]
        remaining = length
        while remaining >= 0x80:
            encoded.append(remaining & 0x7F | 0x80)
            remaining >>= 7
        encoded.append(remaining)
        field = bytes(encoded)
        if len(_raw_output_fields) < 4096:  # BYTES outputs have lengths of every kind
            _raw_output_fields[length] = field
    return field
