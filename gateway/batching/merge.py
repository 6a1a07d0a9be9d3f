"""Merging requests into one batch request, and splitting the batch response back, on the ext kernels.

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
from gateway.ext import gather, scatter, scatter_bytes
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


def _parameters_key(parameters, skip: frozenset = frozenset()) -> tuple:
    if not parameters:
        return ()
    return tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in parameters.items() if k not in skip))


def merge(requests: Sequence, rows: Sequence[int]):
    """One ModelInferRequest holding `requests` stacked along the batch dimension.

    Every request carries raw contents: the dispatcher converts typed contents per request before
    it queues them (so a bad value fails only its own request).
    """
    first = requests[0]
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    total_rows = sum(rows)
    for name_order, tensor in enumerate(first.inputs):
        name = tensor.name
        parts = []
        for request in requests:
            # Inputs may come in any order; the batch key guarantees the same set.
            index = name_order if request.inputs[name_order].name == name else _index_of(request, name)
            parts.append(request.raw_input_contents[index])
        merged_tensor = merged.inputs.add(name=name, datatype=tensor.datatype, shape=[total_rows, *tensor.shape[1:]])
        for key, value in tensor.parameters.items():
            merged_tensor.parameters[key].CopyFrom(value)
        merged.raw_input_contents.append(bytes(gather(parts)))
    merged.outputs.extend(first.outputs)
    for key, value in first.parameters.items():
        if key not in SCHEDULING_PARAMETERS:
            merged.parameters[key].CopyFrom(value)
    return merged


def _index_of(request, name: str) -> int:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return index
    raise KeyError(name)


def split(response, rows: Sequence[int], backend: str = "") -> list:
    """Split a batch response into one ModelInferResponse per request, by row counts.

    Output slices are zero-copy views of the batch response's bytes until they are placed in the
    per-request messages (protobuf takes bytes, so that is the one copy). A response whose outputs do not have the batch's rows is a backend error.
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
    for tensor, raw in zip(response.outputs, raw_outputs):
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
    responses = []
    for index, count in enumerate(rows):
        single = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        for key, value in response.parameters.items():
            single.parameters[key].CopyFrom(value)
        for tensor, pieces in zip(response.outputs, parts):
            out = single.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[count, *tensor.shape[1:]])
            for key, value in tensor.parameters.items():
                out.parameters[key].CopyFrom(value)
            # upb copies bytes into the message; the slice itself was free.
            single.raw_output_contents.append(bytes(pieces[index]))
        responses.append(single)
    return responses
