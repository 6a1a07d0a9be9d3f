"""A packaged model's signature: its input and output tensors, with KServe v2 datatypes and full
shapes (batch dimension included, -1 = any size), read from the model or declared on the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gateway.packaging.errors import SignatureUnknown

#: KServe v2 datatype of each numpy dtype a model can take or give.
DATATYPE_OF_NUMPY = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.int8): "INT8",
    np.dtype(np.uint16): "UINT16", np.dtype(np.int16): "INT16", np.dtype(np.float16): "FP16",
    np.dtype(np.uint32): "UINT32", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
    np.dtype(np.uint64): "UINT64", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64",
}
NUMPY_OF_DATATYPE = {datatype: dtype for dtype, datatype in DATATYPE_OF_NUMPY.items()}
DATATYPES = (*NUMPY_OF_DATATYPE, "BYTES")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> Tensor:
        return cls(data["name"], data["datatype"], tuple(int(d) for d in data["shape"]))

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.datatype == "BYTES" else NUMPY_OF_DATATYPE[self.datatype]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    def as_dict(self) -> dict:
        return {"inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict) -> Signature:
        return cls(tuple(Tensor.from_dict(t) for t in data["inputs"]),
                   tuple(Tensor.from_dict(t) for t in data["outputs"]))

    @property
    def batchable(self) -> bool:
        """Whether every tensor's first dimension is free (-1), so Triton may batch along it."""
        tensors = (*self.inputs, *self.outputs)
        return all(t.shape and t.shape[0] == -1 for t in tensors)

    def describe(self) -> str:
        def one(t: Tensor) -> str:
            return f"{t.name}:{t.datatype}:{','.join(str(d) for d in t.shape)}"
        return f"inputs {' '.join(map(one, self.inputs))}; outputs {' '.join(map(one, self.outputs))}"


def datatype_of(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return DATATYPE_OF_NUMPY[dtype]
    except KeyError:
        raise SignatureUnknown(f"numpy dtype {dtype} has no KServe v2 datatype; expected one of "
                               f"{', '.join(str(d) for d in DATATYPE_OF_NUMPY)}") from None


def parse_tensor_option(text: str, option: str) -> Tensor:
    """`NAME:DTYPE:DIMS` (e.g. `input:FP32:-1,4`) as given to --input/--output."""
    parts = text.split(":")
    if len(parts) != 3:
        raise SignatureUnknown(f"{option} {text!r}: expected NAME:DATATYPE:DIMS, e.g. {option} x:FP32:-1,4")
    name, datatype, dims = parts
    if not _NAME.match(name):
        raise SignatureUnknown(f"{option} {text!r}: {name!r} is not a tensor name (letters, digits, _ . -)")
    datatype = datatype.upper()
    if datatype not in DATATYPES:
        raise SignatureUnknown(f"{option} {text!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        raise SignatureUnknown(f"{option} {text!r}: dims must be integers separated by commas (-1 for any size)") from None
    if any(d < -1 or d == 0 for d in shape):
        raise SignatureUnknown(f"{option} {text!r}: each dim must be a positive size or -1 (any size)")
    return Tensor(name, datatype, shape)


def tensor_of_array(name: str, array: np.ndarray, batch_free: bool) -> Tensor:
    """A tensor named `name` shaped like `array`, its first dimension free when `batch_free`."""
    shape = tuple(int(d) for d in np.shape(array))
    if batch_free and shape:
        shape = (-1, *shape[1:])
    return Tensor(name, datatype_of(np.asarray(array).dtype), shape)
