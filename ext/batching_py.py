"""Plain-Python/NumPy twin of batching.pyx, same signatures, results and error messages; used when extensions are off."""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence

import numpy as np

_LENGTH = struct.Struct("<I")
_MAX_ELEMENT_BYTES = 0xFFFFFFFF

# Little-endian NumPy dtype of each fixed-size KServe datatype.
_DTYPES = {
    "BOOL": np.dtype("?"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
#: Bytes per element of each datatype these kernels convert (tests hold it equal to gateway/protocol/tensors.py).
DATATYPE_ITEMSIZE = {name: dtype.itemsize for name, dtype in _DTYPES.items()}
_BOUNDS = {name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)) for name, dtype in _DTYPES.items() if dtype.kind in "iu"}


# ---------------------------------------------------------------------------------------------- gather

def _part_views(parts) -> list[memoryview]:
    if not isinstance(parts, (list, tuple)):
        if isinstance(parts, (str, bytes, bytearray, memoryview)) or not hasattr(parts, "__iter__"):
            raise TypeError("parts must be a sequence of bytes-like objects")
        parts = list(parts)
    views = []
    for part in parts:
        view = memoryview(part)
        if not view.c_contiguous:
            raise BufferError("a part is not C-contiguous")
        views.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
    return views


def gather(parts) -> bytearray:
    """Concatenate the raw tensor bytes of N requests into one new buffer: one allocation, one memcpy per part."""
    return bytearray().join(_part_views(parts))  # sizes every part first, then one allocation and a memcpy each


def gather_into(parts, out, offset: int = 0) -> int:
    """Concatenate the parts into the writable buffer `out` at `offset`; returns the end offset.

    Raises ValueError, writing nothing, if the parts do not fit. Parts may be views of `out` itself.
    """
    views = _part_views(parts)
    offset = operator.index(offset)
    total = sum(view.nbytes for view in views)
    target = memoryview(out)
    if target.readonly:
        raise BufferError("Object is not writable.")
    if not target.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    target = target.cast("B") if target.ndim != 1 or target.format != "B" else target
    if offset < 0 or offset > target.nbytes or total > target.nbytes - offset:
        raise ValueError(f"the parts need {total} bytes at offset {offset} but out holds {target.nbytes} bytes")
    position = offset
    for view in views:
        target[position:position + view.nbytes] = view  # memoryview assignment copies safely on overlap
        position += view.nbytes
    return position


# ------------------------------------------------------------------------------------ typed -> raw

def _out_of_range(value, datatype: str) -> ValueError:
    low, high = _BOUNDS[datatype]
    return ValueError(f"value {int(value)} is out of range for {datatype} ({low} to {high})")


def _as_double(value) -> float:
    """PyFloat_AsDouble's rules: `__float__`, else `__index__`; strings are not numbers."""
    if isinstance(value, float):
        return value
    if hasattr(type(value), "__float__"):
        return float(value)
    if hasattr(type(value), "__index__"):
        return float(operator.index(value))
    raise TypeError(f"must be real number, not {type(value).__name__}")


def _items(values):
    """Each item by index, as the kernel reads them, refusing a sequence that shrinks while it is read."""
    for index in range(len(values)):
        if index >= len(values):
            raise RuntimeError("the sequence changed size while it was being read")
        yield values[index]


def _numeric_array(values) -> np.ndarray | None:
    """`values` as a 1-D bool/int/float array, or None when NumPy cannot say (objects, ragged, strings)."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "biuf":
        return None
    return array


def _integers(values, datatype: str) -> bytes:
    low, high = _BOUNDS[datatype]
    array = _numeric_array(values)
    if array is not None and array.dtype.kind in "biu":
        # Bounds compared as Python ints: a float comparison would round 2**63 and 2**63 - 1 together.
        if array.size == 0 or (low <= int(array.min()) and int(array.max()) <= high):
            return array.astype(_DTYPES[datatype]).tobytes()
        values = array.tolist()
    integers = []
    for value in _items(values):
        value = operator.index(value)
        if not low <= value <= high:
            raise _out_of_range(value, datatype)
        integers.append(value)
    return np.array(integers, dtype=_DTYPES[datatype]).tobytes()


def _floats(values, datatype: str) -> bytes:
    array = _numeric_array(values)
    if array is None or array.dtype.kind not in "biuf":
        array = np.array([_as_double(value) for value in _items(values)], dtype=np.float64)
    # Through float64 first, as the kernel converts every value to a C double before narrowing.
    with np.errstate(over="ignore"):
        return array.astype(np.float64).astype(_DTYPES[datatype]).tobytes()


def _bools(values) -> bytes:
    array = _numeric_array(values)
    if array is None:
        return bytes(1 if value else 0 for value in _items(values))
    return (array != 0).tobytes()


def typed_to_raw(values: Sequence, datatype: str) -> bytes:
    """Typed contents of one tensor (any sequence of numbers or bools) as raw little-endian bytes.

    Integers must be integral (`__index__`) and fit `datatype`, else ValueError names the value and
    the datatype; floats convert as NumPy's cast does. BYTES goes through `bytes_typed_to_raw`.
    """
    if not isinstance(datatype, str):
        raise TypeError(f"datatype must be str, not {type(datatype).__name__}")
    if datatype not in _DTYPES:
        if datatype == "BYTES":
            raise ValueError("BYTES contents are not fixed-size: use bytes_typed_to_raw")
        raise ValueError(f"unsupported datatype {datatype!r} for typed contents")
    if not hasattr(values, "__len__"):
        values = list(values)
    if datatype == "BOOL":
        return _bools(values)
    if datatype in ("FP32", "FP64"):
        return _floats(values, datatype)
    return _integers(values, datatype)


def bytes_typed_to_raw(values: Sequence[bytes]) -> bytes:
    """Typed BYTES contents as a raw BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    pieces = []
    for index, value in enumerate(values):
        size = memoryview(value).nbytes
        if size > _MAX_ELEMENT_BYTES:
            raise ValueError(
                f"BYTES element {index} holds {size} bytes; a raw BYTES length is at most {_MAX_ELEMENT_BYTES}"
            )
        pieces.append(_LENGTH.pack(size))
        pieces.append(value)
    return b"".join(pieces)


# --------------------------------------------------------------------------------------------- scatter

def _byte_view(buffer) -> memoryview:
    """A flat unsigned-byte memoryview of `buffer` (slices of it keep `buffer` as their `.obj`)."""
    view = memoryview(buffer)
    if view.ndim == 1 and view.format == "B" and view.strides[0] == 1:
        return view
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B")


def _counts(values, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)):
        values = list(values)
    counts = [operator.index(value) for value in _items(values)]
    for index, count in enumerate(counts):
        if count < 0:
            raise ValueError(f"{what}[{index}] is negative ({count})")
    return counts


def scatter(buffer, row_counts: Sequence[int], row_bytes: int) -> list[memoryview]:
    """Split a batched fixed-size tensor by rows into zero-copy memoryview slices of `buffer`.

    Raises ValueError unless sum(row_counts) * row_bytes == len(buffer) in bytes.
    """
    view = _byte_view(buffer)
    row_bytes = operator.index(row_bytes)
    if row_bytes < 0:
        raise ValueError(f"row_bytes is negative ({row_bytes})")
    counts = _counts(row_counts, "row_counts")
    if sum(counts) * row_bytes != view.nbytes:
        raise ValueError(
            f"sum(row_counts) * row_bytes = {sum(counts)} * {row_bytes} does not match the {view.nbytes}-byte buffer"
        )
    slices = []
    start = 0
    for count in counts:
        stop = start + count * row_bytes
        slices.append(view[start:stop])
        start = stop
    return slices


def scatter_bytes(buffer, element_counts: Sequence[int]) -> list[memoryview]:
    """Split a batched raw BYTES tensor into zero-copy slices of element_counts[i] elements each.

    A length prefix that runs past the end, a truncated prefix, too few elements or leftover bytes
    raise ValueError with the offset; nothing outside `buffer` is ever read.
    """
    view = _byte_view(buffer)
    size = view.nbytes
    counts = _counts(element_counts, "element_counts")
    slices = []
    offset = 0
    for request, count in enumerate(counts):
        start = offset
        for element in range(count):
            if size - offset < 4:
                raise ValueError(
                    f"BYTES buffer truncated: request {request} element {element} needs a 4-byte length"
                    f" prefix at offset {offset} but only {size - offset} bytes remain"
                )
            (length,) = _LENGTH.unpack_from(view, offset)
            if length > size - offset - 4:
                raise ValueError(
                    f"corrupt BYTES length {length} at offset {offset} (request {request} element"
                    f" {element}): it runs past the end of the {size}-byte buffer"
                )
            offset += 4 + length
        slices.append(view[start:offset])
    if offset != size:
        raise ValueError(
            f"{size - offset} leftover bytes at offset {offset} after the {sum(counts)}"
            f" BYTES elements of {len(counts)} requests"
        )
    return slices
