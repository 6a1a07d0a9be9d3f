"""Request layouts: validation worked out once per distinct request layout, not once per request.

A request whose tensors travel in raw_input_contents has a *layout*: how many raw buffers it
carries, each input's name, datatype, shape and parameters, each requested output's name and
parameters. Two such requests with the same layout pass or fail every check of validate_request
alike except the checks of the buffers themselves (byte sizes, BYTES element counts), which read
the data, and of the request's own parameters. So a layout that passed validation once is
remembered with what each of its buffers must hold, and a later request of that layout has only
its parameters and buffers checked; a request that fails them is validated in full, so its
refusal is the one validate_request gives (Triton's, naming the request's id). Requests with typed contents carry their data in the tensors and have no
layout: they are validated in full every time.

The layout is also what the batching stage finds a request's queue by (`Exchange.layout`): the
batch key is a function of it for requests without request parameters.
"""

from __future__ import annotations

from math import prod

from gateway.ext import bytes_element_count
from gateway.pipeline.validation import check_parameters, validate_request
from gateway.protocol import pb
from gateway.protocol.tensors import ELEMENT_BYTES, ModelSignature

#: Layouts remembered per model version; past this the memory starts over (clients that send an
#: unbounded variety of shapes cost a full validation per request, as without it).
MAX_LAYOUTS = 1024


def layout_of(request) -> tuple | None:
    """(number of raw buffers, each input serialized, each requested output serialized), or None
    for a request without raw contents.

    One upb call per tensor (name, datatype, shape, parameters — and typed contents, which a
    request with raw buffers does not carry, else they are part of its layout too) costs less than
    reading the fields one by one. Equal bytes are equal tensors; equal tensors serialized in
    another order (a map's entries) only make a layout of their own.
    """
    raw = request.raw_input_contents
    return _layout(request, len(raw)) if raw else None


_serialized_input = pb.ModelInferRequest.InferInputTensor.SerializeToString
_serialized_output = pb.ModelInferRequest.InferRequestedOutputTensor.SerializeToString


def _layout(request, buffers: int) -> tuple:
    outputs = request.outputs
    if outputs:
        return buffers, tuple(map(_serialized_input, request.inputs)), tuple(map(_serialized_output, outputs))
    return buffers, tuple(map(_serialized_input, request.inputs)), ()


class ValidatedLayouts:
    """The layouts of one model version that passed validation, each with what its buffers must
    hold: (byte size, or None for BYTES, whose elements are counted; elements) per input."""

    __slots__ = ("signature", "_known")

    def __init__(self, signature: ModelSignature) -> None:
        self.signature = signature
        self._known: dict[tuple, tuple] = {}

    def __repr__(self) -> str:
        return f"<ValidatedLayouts {self.signature.name} known={len(self._known)}>"

    def __len__(self) -> int:
        return len(self._known)

    def validate(self, request) -> tuple | None:
        """validate_request(request, signature), its structure checked once per layout; returns the
        request's layout (None when it has none). Raises what validate_request raises."""
        raw = request.raw_input_contents
        if not raw:
            validate_request(request, self.signature)
            return None
        layout = _layout(request, len(raw))
        buffers = self._known.get(layout)
        if buffers is None:
            validate_request(request, self.signature)  # only a layout that passes is remembered
            if len(self._known) >= MAX_LAYOUTS:
                self._known.clear()
            self._known[layout] = _buffers(request)
            return layout
        if len(request.parameters):
            check_parameters(request.parameters)
        for data, (size, elements) in zip(raw, buffers):
            if len(data) != size if size is not None else bytes_element_count(data) != elements:
                validate_request(request, self.signature)  # raises the refusal, worded as in full
        return layout


def _buffers(request) -> tuple:
    """What each raw buffer of a validated request (and of every request of its layout) must hold."""
    buffers = []
    for tensor in request.inputs:
        elements = prod(tensor.shape)
        datatype = tensor.datatype
        size = elements * ELEMENT_BYTES[datatype] if datatype in ELEMENT_BYTES else None
        buffers.append((size, elements))
    return tuple(buffers)
