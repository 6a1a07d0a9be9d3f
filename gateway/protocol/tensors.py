"""The KServe v2 tensor vocabulary the gateway checks, batches and histograms requests with.

One home for the datatype tables (the Cython kernels in ext/ keep their own copies, which
tests/test_layers.py holds equal to these), what a model accepts (`ModelSignature`, built from a
backend's metadata and config), the names of Triton's final-response flags, and the conversion
of a request's typed contents to raw bytes (`raw_of_typed`, with the kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.errors import InvalidArgument
from gateway.ext import bytes_typed_to_raw, typed_to_raw

#: Bytes per element of each fixed-size KServe v2 datatype (BYTES is variable-size).
ELEMENT_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1,
    "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4,
    "UINT64": 8, "INT64": 8, "FP64": 8,
}

#: numpy dtype of each numeric datatype numpy can hold (BF16 has none; BYTES is not numeric).
NUMPY_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16,
    "FP16": np.float16, "UINT32": np.uint32, "INT32": np.int32, "FP32": np.float32,
    "UINT64": np.uint64, "INT64": np.int64, "FP64": np.float64,
}

#: Which InferTensorContents field carries each datatype's typed (non-raw) values. FP16 and BF16
#: have none: they travel in raw_input_contents only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: Tensor parameters that point at a shared-memory region instead of carrying the data.
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

#: A request parameter asking a decoupled model for an empty response that marks the last one.
FINAL_FLAG_REQUEST = "triton_enable_empty_final_response"
#: The response parameter Triton sets on a request's last response (on streams only).
FINAL_FLAG_RESPONSE = "triton_final_response"


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
    """The model's own max_sequence_idle_microseconds, or None when its config does not set one."""

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


def raw_of_typed(request) -> list[bytes]:
    """The raw bytes of each input of a request that carries typed contents, as Triton reads them.

    One request at a time, so a value out of range for its datatype fails this request alone
    (INVALID_ARGUMENT naming the input), never the requests batched or sent with it.
    """
    raw = []
    for tensor in request.inputs:
        try:
            if tensor.datatype == "BYTES":
                raw.append(bytes_typed_to_raw(tensor.contents.bytes_contents))
            else:
                field = CONTENTS_FIELD.get(tensor.datatype)
                values = getattr(tensor.contents, field) if field is not None else ()
                raw.append(typed_to_raw(values, tensor.datatype) if values else b"")
        except ValueError as error:
            raise InvalidArgument(f"input '{tensor.name}' of model '{request.model_name}': {error}") from None
    return raw
