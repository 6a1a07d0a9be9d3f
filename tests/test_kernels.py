"""The batching kernels: Cython and its NumPy twin agree, round-trip, and refuse corrupt or out-of-range input."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ext import batching, batching_py
from gateway.protocol import pb

IMPLEMENTATIONS = pytest.mark.parametrize("kernels", [batching, batching_py], ids=["cython", "twin"])

DTYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP32": np.float32, "FP64": np.float64,
}
INTEGER_TYPES = [name for name, dtype in DTYPES.items() if np.dtype(dtype).kind in "iu"]
# Where a KServe v2 request carries each datatype's typed contents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}

chunks = st.binary(max_size=64)
byte_parts = st.lists(chunks, max_size=12)


def as_buffer(data: bytes, kind: str):
    """The same bytes as each kind of buffer a gateway meets: bytes, bytearray, memoryview, NumPy array."""
    return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
            "ndarray": np.frombuffer(data, np.uint8).copy()}[kind]


buffer_kinds = st.sampled_from(["bytes", "bytearray", "memoryview", "ndarray"])


def values_for(datatype: str):
    dtype = np.dtype(DTYPES[datatype])
    if datatype == "BOOL":
        return st.lists(st.booleans(), max_size=40)
    if dtype.kind == "f":
        return st.lists(st.floats(width=dtype.itemsize * 8), max_size=40)
    info = np.iinfo(dtype)
    return st.lists(st.integers(int(info.min), int(info.max)), max_size=40)


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def reference_split(buffer: bytes, counts: list[int]) -> list[bytes] | None:
    """An independent reading of a batched BYTES tensor: per-request slices, or None when it is corrupt."""
    offset, slices = 0, []
    for count in counts:
        start = offset
        for _ in range(count):
            if offset + 4 > len(buffer):
                return None
            (length,) = struct.unpack_from("<I", buffer, offset)
            if offset + 4 + length > len(buffer):
                return None
            offset += 4 + length
        slices.append(buffer[start:offset])
    return slices if offset == len(buffer) else None


def outcome(function, *args):
    """What a call did, comparable across the twins: ('ok', result as bytes) or (exception type, message)."""
    try:
        result = function(*args)
    except (ValueError, TypeError, BufferError) as error:
        return type(error).__name__, str(error)
    if isinstance(result, list):
        return "ok", [bytes(view) for view in result]
    return "ok", bytes(result) if not isinstance(result, int) else result


# ---------------------------------------------------------------------------------------------- gather

@IMPLEMENTATIONS
@given(parts=byte_parts, kinds=st.lists(buffer_kinds, min_size=12, max_size=12))
def test_gather_concatenates_any_buffers(kernels, parts, kinds):
    buffers = [as_buffer(part, kind) for part, kind in zip(parts, kinds)]
    batch = kernels.gather(buffers)
    assert type(batch) is bytearray
    assert batch == b"".join(parts)
    assert batch == batching.gather(iter(buffers)) == batching_py.gather(iter(buffers))


@IMPLEMENTATIONS
def test_gather_accepts_multidimensional_arrays_and_refuses_strided_ones(kernels):
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert kernels.gather([tensor, tensor[1]]) == tensor.tobytes() + tensor[1].tobytes()
    with pytest.raises((BufferError, ValueError)):  # the exporter chooses which (NumPy: ValueError)
        kernels.gather([tensor[:, ::2]])
    with pytest.raises((BufferError, ValueError)):
        kernels.gather_into([tensor[:, ::2]], bytearray(24))
    with pytest.raises(TypeError):
        kernels.gather(["text"])
    with pytest.raises(TypeError):
        kernels.gather(42)


@IMPLEMENTATIONS
@given(parts=byte_parts, slack=st.integers(0, 16), offset=st.integers(0, 16))
def test_gather_into_writes_at_offset(kernels, parts, slack, offset):
    total = sum(map(len, parts))
    out = bytearray(b"\xee" * (offset + total + slack))
    end = kernels.gather_into(parts, out, offset)
    assert end == offset + total
    assert out == b"\xee" * offset + b"".join(parts) + b"\xee" * slack


@IMPLEMENTATIONS
def test_gather_into_refuses_what_does_not_fit_and_writes_nothing(kernels):
    out = bytearray(8)
    for offset in (-1, 5, 9):
        with pytest.raises(ValueError, match=f"need 4 bytes at offset {offset} but out holds 8 bytes"):
            kernels.gather_into([b"ab", b"cd"], out, offset)
    assert out == bytearray(8)
    with pytest.raises(BufferError):
        kernels.gather_into([b"ab"], b"readonly")
    floats = np.zeros(4, np.float32)
    assert kernels.gather_into([np.float32([1.5, 2.5]).tobytes()], floats, 4) == 12
    assert floats.tolist() == [0.0, 1.5, 2.5, 0.0]


@IMPLEMENTATIONS
def test_gather_into_handles_parts_that_overlap_out(kernels):
    out = bytearray(b"abcdefgh")
    kernels.gather_into([memoryview(out)[0:4]], out, 2)  # memmove semantics, not memcpy
    assert out == b"ababcdgh"


# --------------------------------------------------------------------------------------------- scatter

@IMPLEMENTATIONS
@given(row_bytes=st.integers(0, 48), row_counts=st.lists(st.integers(0, 5), max_size=10), data=st.data())
def test_gather_then_scatter_gives_back_the_parts(kernels, row_bytes, row_counts, data):
    parts = [data.draw(st.binary(min_size=count * row_bytes, max_size=count * row_bytes)) for count in row_counts]
    batch = kernels.gather(parts)
    views = kernels.scatter(batch, row_counts, row_bytes)
    assert [bytes(view) for view in views] == parts
    assert all(view.obj is batch for view in views)
    assert outcome(batching.scatter, bytes(batch), row_counts, row_bytes) == outcome(
        batching_py.scatter, bytes(batch), row_counts, row_bytes
    )


@IMPLEMENTATIONS
def test_scatter_is_zero_copy(kernels):
    source = bytearray(range(12))
    views = kernels.scatter(source, [1, 2], 4)
    assert all(view.obj is source for view in views)
    source[4] = 99  # the write shows through: the views are slices of the source, not copies
    assert views[1][0] == 99
    frozen = bytes(range(12))
    assert all(view.obj is frozen for view in kernels.scatter(frozen, [3], 4))
    floats = np.arange(6, dtype=np.float32)
    halves = kernels.scatter(memoryview(floats), [1, 2], 8)
    assert [np.frombuffer(view, np.float32).tolist() for view in halves] == [[0, 1], [2, 3, 4, 5]]
    assert np.shares_memory(np.frombuffer(halves[1], np.float32), floats)


@IMPLEMENTATIONS
@given(row_bytes=st.integers(0, 16), row_counts=st.lists(st.integers(0, 4), max_size=6), kind=buffer_kinds,
       data=st.data())
def test_scatter_views_behave_like_memoryview_slices(kernels, row_bytes, row_counts, kind, data):
    """The kernel builds its slices without slice objects; they must be indistinguishable from `view[a:b]`."""
    total = sum(row_counts) * row_bytes
    source = as_buffer(data.draw(st.binary(min_size=total, max_size=total)), kind)
    plain = memoryview(source).cast("B") if kind == "ndarray" else memoryview(source)
    start = 0
    for view, count in zip(kernels.scatter(source, row_counts, row_bytes), row_counts):
        expected = plain[start:start + count * row_bytes]
        start += count * row_bytes
        assert (view.obj, view.nbytes, len(view), view.shape, view.strides, view.format, view.itemsize) == (
            expected.obj, expected.nbytes, len(expected), expected.shape, expected.strides, expected.format,
            expected.itemsize,
        )
        assert (view.readonly, view.c_contiguous, view.contiguous) == (expected.readonly, True, True)
        assert view.tobytes() == expected.tobytes() and view.tolist() == expected.tolist() and view == expected
        if view.nbytes:
            assert view[-1] == expected[-1] and bytes(view[1:]) == bytes(expected[1:])
        if view.readonly:
            assert hash(view) == hash(expected.tobytes())


@IMPLEMENTATIONS
def test_scatter_views_pin_a_bytearray_until_released(kernels):
    source = bytearray(16)
    views = kernels.scatter(source, [2, 2], 4)
    with pytest.raises(BufferError):
        source.extend(b"x")  # exported: resizing would leave the views dangling
    for view in views:
        view.release()
    source.extend(b"x")
    with pytest.raises(ValueError):
        views[0][0]


@IMPLEMENTATIONS
@pytest.mark.parametrize(
    ("row_counts", "row_bytes", "message"),
    [
        ([1, 1], 4, r"sum\(row_counts\) \* row_bytes = 2 \* 4 does not match the 12-byte buffer"),
        ([4], 4, "4 \\* 4 does not match"),
        ([1, -1, 2], 4, r"row_counts\[1\] is negative"),
        ([3], -4, "row_bytes is negative"),
        ([2**62, 2**62], 4, "does not match"),
    ],
)
def test_scatter_refuses_mismatched_rows(kernels, row_counts, row_bytes, message):
    with pytest.raises(ValueError, match=message):
        kernels.scatter(bytes(12), row_counts, row_bytes)


@IMPLEMENTATIONS
def test_scatter_refuses_strided_buffers(kernels):
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.scatter(memoryview(bytes(12))[::2], [1], 6)


# ---------------------------------------------------------------------------------------- typed → raw

@IMPLEMENTATIONS
@pytest.mark.parametrize("datatype", list(DTYPES))
@given(data=st.data())
def test_typed_to_raw_matches_numpy(kernels, datatype, data):
    values = data.draw(values_for(datatype))
    with np.errstate(over="ignore"):
        expected = np.asarray(values, DTYPES[datatype]).tobytes()
    assert kernels.typed_to_raw(values, datatype) == expected
    assert kernels.typed_to_raw(tuple(values), datatype) == expected


@IMPLEMENTATIONS
@pytest.mark.parametrize("datatype", list(DTYPES))
@given(data=st.data())
def test_typed_to_raw_reads_protobuf_repeated_fields(kernels, datatype, data):
    contents = pb.InferTensorContents()
    field = getattr(contents, CONTENTS_FIELD[datatype])
    field.extend(data.draw(values_for(datatype)))
    with np.errstate(over="ignore"):
        expected = np.asarray(list(field), DTYPES[datatype]).tobytes()
    assert kernels.typed_to_raw(field, datatype) == expected


@IMPLEMENTATIONS
@given(values=st.lists(st.floats(), max_size=20), datatype=st.sampled_from(["FP32", "FP64"]))
def test_typed_to_raw_narrows_doubles_as_numpy_does(kernels, values, datatype):
    with np.errstate(over="ignore"):
        expected = np.asarray(values, DTYPES[datatype]).tobytes()
    assert kernels.typed_to_raw(values, datatype) == expected


@IMPLEMENTATIONS
def test_typed_to_raw_accepts_numpy_scalars_bools_and_ints_as_numbers(kernels):
    assert kernels.typed_to_raw([np.int64(7), True, 3], "INT16") == np.int16([7, 1, 3]).tobytes()
    assert kernels.typed_to_raw([1, np.float32(0.5), False], "FP32") == np.float32([1, 0.5, 0]).tobytes()
    assert kernels.typed_to_raw([0, 2, 0.0, float("nan"), "x", ""], "BOOL") == bytes([0, 1, 0, 1, 1, 0])
    assert kernels.typed_to_raw([2**64 - 1, 2**63], "UINT64") == np.uint64([2**64 - 1, 2**63]).tobytes()
    assert kernels.typed_to_raw([2**70, -1.5], "FP64") == np.float64([2**70, -1.5]).tobytes()
    assert kernels.typed_to_raw([], "INT32") == b""


def out_of_range_values(datatype: str):
    info = np.iinfo(DTYPES[datatype])
    return st.one_of(st.integers(max_value=int(info.min) - 1), st.integers(min_value=int(info.max) + 1))


@IMPLEMENTATIONS
@pytest.mark.parametrize("datatype", INTEGER_TYPES)
@given(data=st.data())
def test_typed_to_raw_refuses_out_of_range_integers(kernels, datatype, data):
    bad = data.draw(out_of_range_values(datatype))
    info = np.iinfo(DTYPES[datatype])
    values = data.draw(st.lists(st.integers(int(info.min), int(info.max)), max_size=5))
    values.insert(data.draw(st.integers(0, len(values))), bad)
    with pytest.raises(ValueError) as error:
        kernels.typed_to_raw(values, datatype)
    assert f"value {bad} is out of range for {datatype}" in str(error.value)
    assert outcome(batching.typed_to_raw, values, datatype) == outcome(batching_py.typed_to_raw, values, datatype)


@IMPLEMENTATIONS
def test_typed_to_raw_reports_the_first_bad_value(kernels):
    with pytest.raises(ValueError, match=r"value 256 is out of range for UINT8 \(0 to 255\)"):
        kernels.typed_to_raw([1, 256, -1], "UINT8")
    with pytest.raises(ValueError, match="value -1 is out of range for UINT64"):
        kernels.typed_to_raw(np.array([5, -1]), "UINT64")


@IMPLEMENTATIONS
def test_typed_to_raw_refuses_what_is_not_a_number_of_the_type(kernels):
    with pytest.raises(TypeError):
        kernels.typed_to_raw([1, 2.5], "INT32")  # no silent truncation
    with pytest.raises(TypeError):
        kernels.typed_to_raw(["1.5"], "FP32")  # NumPy would parse it; the protocol never sends it
    with pytest.raises(TypeError):
        kernels.typed_to_raw([[1, 2]], "INT32")
    with pytest.raises(ValueError, match="use bytes_typed_to_raw"):
        kernels.typed_to_raw([b"x"], "BYTES")
    with pytest.raises(ValueError, match="unsupported datatype 'FP16'"):
        kernels.typed_to_raw([1.0], "FP16")


@IMPLEMENTATIONS
@given(elements=st.lists(st.binary(max_size=40), max_size=20), kinds=st.lists(buffer_kinds, min_size=20, max_size=20))
def test_bytes_typed_to_raw_prefixes_lengths(kernels, elements, kinds):
    buffers = [as_buffer(element, kind) for element, kind in zip(elements, kinds)]
    assert kernels.bytes_typed_to_raw(buffers) == serialize_bytes(elements)
    contents = pb.InferTensorContents()
    contents.bytes_contents.extend(elements)
    assert kernels.bytes_typed_to_raw(contents.bytes_contents) == serialize_bytes(elements)


@IMPLEMENTATIONS
def test_bytes_typed_to_raw_refuses_text(kernels):
    with pytest.raises(TypeError):
        kernels.bytes_typed_to_raw([b"ok", "text"])


# ------------------------------------------------------------------------------------- scatter_bytes

requests_of_elements = st.lists(st.lists(st.binary(max_size=24), max_size=6), max_size=8)


@IMPLEMENTATIONS
@given(requests=requests_of_elements, kind=buffer_kinds)
def test_bytes_round_trip(kernels, requests, kind):
    raws = [kernels.bytes_typed_to_raw(elements) for elements in requests]
    batch = as_buffer(bytes(kernels.gather(raws)), kind)
    views = kernels.scatter_bytes(batch, [len(elements) for elements in requests])
    assert [bytes(view) for view in views] == raws
    if kind != "memoryview":
        assert all(view.obj is batch for view in views)


def corrupt(data: st.DataObject, raw: bytes) -> bytes:
    """One random corruption of a raw BYTES buffer: cut it, overwrite a length-sized word, append or flip a byte."""
    how = data.draw(st.sampled_from(["truncate", "overwrite", "append", "flip"]))
    if how == "truncate":
        return raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    if how == "append":
        return raw + data.draw(st.binary(min_size=1, max_size=8))
    if not raw:
        return b"\x01"
    position = data.draw(st.integers(0, len(raw) - 1))
    if how == "flip":
        return raw[:position] + bytes([raw[position] ^ data.draw(st.integers(1, 255))]) + raw[position + 1:]
    word = struct.pack("<I", data.draw(st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))))
    return (raw[:position] + word + raw[position + 4:])[: len(raw)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(requests=requests_of_elements, data=st.data())
def test_corrupt_bytes_never_pass_silently(requests, data):
    counts = [len(elements) for elements in requests]
    damaged = corrupt(data, b"".join(serialize_bytes(elements) for elements in requests))
    expected = reference_split(damaged, counts)
    results = [outcome(kernels.scatter_bytes, damaged, counts) for kernels in (batching, batching_py)]
    assert results[0] == results[1]  # same slices, or the same error word for word
    if expected is None:
        assert results[0][0] == "ValueError" and "offset" in results[0][1]
    else:  # the damage left a well-formed buffer: the split must be its true split
        assert results[0] == ("ok", expected)


@IMPLEMENTATIONS
@pytest.mark.parametrize(
    ("buffer", "counts", "message"),
    [
        (b"\x02\x00\x00\x00ab", [2], "request 0 element 1 needs a 4-byte length prefix at offset 6 but only 0 bytes"),
        (b"\x02\x00\x00", [1], "prefix at offset 0 but only 3 bytes remain"),
        (b"\xff\xff\xff\xffab", [1], "corrupt BYTES length 4294967295 at offset 0"),
        (b"\x01\x00\x00\x00a\x05\x00\x00\x00abc", [1, 1], "corrupt BYTES length 5 at offset 5 .request 1 element 0"),
        (b"\x01\x00\x00\x00ab", [1], "1 leftover bytes at offset 5"),
        (b"\x00\x00\x00\x00", [0], "4 leftover bytes at offset 0"),
        (b"", [1, -1], r"element_counts\[1\] is negative"),
    ],
)
def test_scatter_bytes_names_the_offset(kernels, buffer, counts, message):
    with pytest.raises(ValueError, match=message):
        kernels.scatter_bytes(buffer, counts)


@IMPLEMENTATIONS
def test_scatter_bytes_walks_large_buffers_without_the_gil(kernels):
    elements = [bytes([index % 251]) * (index % 97) for index in range(3000)]  # > 64 KiB: the nogil path
    raw = serialize_bytes(elements)
    views = kernels.scatter_bytes(raw, [1000, 0, 2000])
    assert [bytes(view) for view in views] == [serialize_bytes(elements[:1000]), b"", serialize_bytes(elements[1000:])]
    with pytest.raises(ValueError, match="leftover"):
        kernels.scatter_bytes(raw, [2999])


# --------------------------------------------------------------------------------------- the switch

@pytest.mark.parametrize(("setting", "using", "module"), [("1", False, "gateway.ext.batching_py"), ("", True, "gateway.ext.batching")])
def test_environment_switch_picks_the_implementation(setting, using, module):
    probe = "import gateway.ext as ext; print(ext.USING_EXTENSIONS, ext.gather.__module__, ext.bytes_element_count.__module__)"
    environment = {**os.environ, "TENSORGATE_NO_EXTENSIONS": setting}
    printed = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    used, gather_module, check_module = printed.stdout.split()
    assert used == str(using)
    assert gather_module == module
    assert check_module == module.replace("batching", "tensorcheck")


class Shrinker:
    """An integer whose conversion empties the list it sits in, as hostile `__index__` code could."""

    def __init__(self, victim: list):
        self.victim = victim

    def __index__(self) -> int:
        self.victim.clear()
        return 1

    __float__ = lambda self: float(self.__index__())  # noqa: E731


@IMPLEMENTATIONS
@pytest.mark.parametrize("datatype", ["INT32", "FP32"])
def test_a_list_emptied_while_it_is_read_is_refused_not_overrun(kernels, datatype):
    values: list = [1, 2]
    values.insert(1, Shrinker(values))
    with pytest.raises(RuntimeError, match="changed size"):
        kernels.typed_to_raw(values, datatype)
    counts: list = [1, 1]
    counts.insert(0, Shrinker(counts))
    with pytest.raises(RuntimeError, match="changed size"):
        kernels.scatter(bytes(12), counts, 4)
