# cython: language_level=3
"""Dynamic-batching kernels: gather request tensors into one batch, scatter the batched response back.

Every buffer is taken through the buffer protocol (bytes, bytearray, memoryview, NumPy arrays), held
for the whole copy so that no bytearray can resize under it, and released on every path. Copies of
64 KiB and more run without the GIL. Raw bytes are little-endian, as KServe v2 and Triton require;
the module refuses to import on a big-endian host rather than write wrong bytes there.
"""

import sys

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_AsDouble, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.number cimport PyNumber_Index
from cpython.list cimport PyList_CheckExact
from cpython.object cimport PyObject_IsTrue
from cpython.sequence cimport (
    PySequence_Check, PySequence_Fast, PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE, PySequence_GetItem,
    PySequence_Size,
)
from cpython.tuple cimport PyTuple_CheckExact
from libc.stdint cimport (
    int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT64_MAX, INT64_MIN, UINT32_MAX,
)
from libc.string cimport memcpy, memmove

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Ask for transparent huge pages on a fresh multi-MiB buffer before its first write, as NumPy does for
       its large arrays: one fault per 2 MiB instead of per 4 KiB, which is most of the cost of filling
       memory the kernel has just mapped. Advice only; where it is unknown this does nothing. */
    static void tensorgate_advise_huge_pages(char *start, Py_ssize_t size) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        Py_ssize_t skip = (Py_ssize_t)((4096 - (size_t)start % 4096) % 4096);
        if (size > skip) {
            madvise(start + skip, (size_t)(size - skip), MADV_HUGEPAGE);
        }
    #else
        (void)start; (void)size;
    #endif
    }
    """
    void tensorgate_advise_huge_pages(char* start, Py_ssize_t size) nogil

cdef extern from *:
    """
    /* base[start:stop] for a flat, unit-stride 'B' memoryview, done the way memoryview's own slicing does
       it (Objects/memoryobject.c: a new view registered on the same managed buffer, then init_slice and
       init_len narrow buf, shape[0] and len) but without building two ints and a slice object per call,
       which is two thirds of the cost. The caller guarantees 0 <= start <= stop <= len(base). */
    static PyObject *tensorgate_byte_slice(PyObject *base, Py_ssize_t start, Py_ssize_t stop) {
    #if defined(PYPY_VERSION)
        return PySequence_GetSlice(base, start, stop);
    #else
        PyObject *view = PyMemoryView_FromObject(base);
        if (view != NULL) {
            Py_buffer *info = PyMemoryView_GET_BUFFER(view);
            info->buf = (char *)info->buf + start;
            info->shape[0] = stop - start;
            info->len = stop - start;
        }
        return view;
    #endif
    }
    """
    object tensorgate_byte_slice(object base, Py_ssize_t start, Py_ssize_t stop)

if sys.byteorder != "little":  # pragma: no cover - no supported platform is big-endian
    raise ImportError("gateway.ext.batching writes little-endian tensors and needs a little-endian host")

cdef enum:
    # Below this many bytes, releasing and retaking the GIL costs more than the copy itself.
    NOGIL_BYTES = 65536
    # Parts gathered without a heap allocation for their buffer descriptors (most batches are smaller).
    STACK_PARTS = 16
    # Fresh buffers this large are given the huge-page advice (NumPy's threshold for the same advice).
    HUGE_PAGE_BYTES = 4 * 1024 * 1024

cdef enum DataType:
    DT_BOOL, DT_INT8, DT_INT16, DT_INT32, DT_INT64, DT_UINT8, DT_UINT16, DT_UINT32, DT_UINT64, DT_FP32, DT_FP64

cdef dict _DATATYPES = {
    "BOOL": DT_BOOL, "INT8": DT_INT8, "INT16": DT_INT16, "INT32": DT_INT32, "INT64": DT_INT64,
    "UINT8": DT_UINT8, "UINT16": DT_UINT16, "UINT32": DT_UINT32, "UINT64": DT_UINT64,
    "FP32": DT_FP32, "FP64": DT_FP64,
}
cdef Py_ssize_t[11] _ITEMSIZE = [1, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8]
#: Bytes per element of each datatype these kernels convert (tests hold it equal to gateway/protocol/tensors.py).
DATATYPE_ITEMSIZE = {name: _ITEMSIZE[code] for name, code in _DATATYPES.items()}
# Inclusive bounds of the signed and narrow unsigned types (UINT64 is checked on its own).
cdef int64_t[11] _LOW = [0, -128, -32768, -2147483648, INT64_MIN, 0, 0, 0, 0, 0, 0]
cdef int64_t[11] _HIGH = [1, 127, 32767, 2147483647, INT64_MAX, 255, 65535, 4294967295, 0, 0, 0]
_BOUNDS_TEXT = {
    "INT8": "-128 to 127", "INT16": "-32768 to 32767", "INT32": "-2147483648 to 2147483647",
    "INT64": "-9223372036854775808 to 9223372036854775807", "UINT8": "0 to 255", "UINT16": "0 to 65535",
    "UINT32": "0 to 4294967295", "UINT64": "0 to 18446744073709551615",
}


# ---------------------------------------------------------------------------------------------- gather

cdef inline object _fast_item(object sequence, Py_ssize_t index):
    """Item `index` of a PySequence_Fast result, re-checked: converting an earlier item may run Python code
    (`__index__`, `__float__`, `__buffer__`) that shrinks the very list being read."""
    if index >= PySequence_Fast_GET_SIZE(sequence):
        raise RuntimeError("the sequence changed size while it was being read")
    return <object>PySequence_Fast_GET_ITEM(sequence, index)


cdef int _acquire_parts(object sequence, Py_ssize_t count, Py_buffer* buffers, Py_ssize_t* acquired,
                        Py_ssize_t* total) except -1:
    """Take a read buffer of every part; `acquired` counts how many the caller must release."""
    cdef Py_ssize_t i
    for i in range(count):
        PyObject_GetBuffer(_fast_item(sequence, i), &buffers[i], PyBUF_SIMPLE)
        acquired[0] = i + 1
        total[0] += buffers[i].len
    return 0


cdef void _copy_parts(char* dest, const Py_buffer* buffers, Py_ssize_t count, bint may_overlap) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(count):
        if may_overlap:
            memmove(dest, buffers[i].buf, buffers[i].len)
        else:
            memcpy(dest, buffers[i].buf, buffers[i].len)
        dest += buffers[i].len


cdef void _release_parts(Py_buffer* buffers, Py_buffer* stack_buffers, Py_ssize_t acquired) noexcept:
    cdef Py_ssize_t i
    for i in range(acquired):
        PyBuffer_Release(&buffers[i])
    if buffers != stack_buffers:
        PyMem_Free(buffers)


cdef Py_buffer* _part_buffers(Py_ssize_t count, Py_buffer* stack_buffers) except NULL:
    cdef Py_buffer* buffers
    if count <= STACK_PARTS:
        return stack_buffers
    buffers = <Py_buffer*>PyMem_Malloc(count * sizeof(Py_buffer))
    if buffers == NULL:
        raise MemoryError()
    return buffers


cpdef bytearray gather(object parts):
    """Concatenate the raw tensor bytes of N requests into one new buffer: one allocation, one memcpy per part."""
    cdef object sequence = PySequence_Fast(parts, b"parts must be a sequence of bytes-like objects")
    cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence)
    cdef Py_buffer stack_buffers[STACK_PARTS]
    cdef Py_buffer* buffers = _part_buffers(count, stack_buffers)
    cdef Py_ssize_t acquired = 0
    cdef Py_ssize_t total = 0
    cdef bytearray batch
    cdef char* dest
    try:
        _acquire_parts(sequence, count, buffers, &acquired, &total)
        batch = PyByteArray_FromStringAndSize(NULL, total)
        dest = PyByteArray_AS_STRING(batch)
        if total >= NOGIL_BYTES:
            with nogil:
                if total >= HUGE_PAGE_BYTES:
                    tensorgate_advise_huge_pages(dest, total)
                _copy_parts(dest, buffers, count, False)
        else:
            _copy_parts(dest, buffers, count, False)
        return batch
    finally:
        _release_parts(buffers, stack_buffers, acquired)


cpdef Py_ssize_t gather_into(object parts, object out, Py_ssize_t offset=0) except -1:
    """Concatenate the parts into the writable buffer `out` at `offset`; returns the end offset.

    Raises ValueError, writing nothing, if the parts do not fit. Parts may be views of `out` itself.
    """
    cdef object sequence = PySequence_Fast(parts, b"parts must be a sequence of bytes-like objects")
    cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence)
    cdef Py_buffer stack_buffers[STACK_PARTS]
    cdef Py_buffer* buffers = _part_buffers(count, stack_buffers)
    cdef Py_ssize_t acquired = 0
    cdef Py_ssize_t total = 0
    cdef Py_buffer target
    cdef bint have_target = False
    try:
        _acquire_parts(sequence, count, buffers, &acquired, &total)
        PyObject_GetBuffer(out, &target, PyBUF_WRITABLE)
        have_target = True
        if offset < 0 or offset > target.len or total > target.len - offset:
            raise ValueError(
                f"the parts need {total} bytes at offset {offset} but out holds {target.len} bytes"
            )
        if total >= NOGIL_BYTES:
            with nogil:
                _copy_parts(<char*>target.buf + offset, buffers, count, True)
        else:
            _copy_parts(<char*>target.buf + offset, buffers, count, True)
        return offset + total
    finally:
        if have_target:
            PyBuffer_Release(&target)
        _release_parts(buffers, stack_buffers, acquired)


# ------------------------------------------------------------------------------------ typed -> raw

cdef int _out_of_range(object value, str datatype) except -1:
    raise ValueError(f"value {int(value)} is out of range for {datatype} ({_BOUNDS_TEXT[datatype]})")


cdef inline object _as_integer(object value):
    return value if PyLong_Check(value) else PyNumber_Index(value)


cdef int64_t _signed(object value, DataType code, str datatype) except? -1:
    cdef int overflow = 0
    cdef int64_t result
    value = _as_integer(value)
    result = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or result < _LOW[<int>code] or result > _HIGH[<int>code]:
        _out_of_range(value, datatype)
    return result


cdef uint64_t _unsigned64(object value, str datatype) except? 0xFFFFFFFFFFFFFFFF:
    cdef int overflow = 0
    cdef int64_t result
    value = _as_integer(value)
    result = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0 and result >= 0:
        return <uint64_t>result
    if overflow == 1:
        try:
            return PyLong_AsUnsignedLongLong(value)
        except OverflowError:
            pass
    _out_of_range(value, datatype)


cdef inline double _as_double(object value) except? -1:
    if PyFloat_CheckExact(value):
        return PyFloat_AS_DOUBLE(value)
    return PyFloat_AsDouble(value)


cdef inline object _value(object sequence, Py_ssize_t index, bint fast):
    return _fast_item(sequence, index) if fast else PySequence_GetItem(sequence, index)


cpdef bytes typed_to_raw(object values, str datatype):
    """Typed contents of one tensor (any sequence of numbers or bools) as raw little-endian bytes.

    Integers must be integral (`__index__`) and fit `datatype`, else ValueError names the value and
    the datatype; floats convert as NumPy's cast does. BYTES goes through `bytes_typed_to_raw`.
    """
    code_object = _DATATYPES.get(datatype)
    if code_object is None:
        if datatype == "BYTES":
            raise ValueError("BYTES contents are not fixed-size: use bytes_typed_to_raw")
        raise ValueError(f"unsupported datatype {datatype!r} for typed contents")
    cdef DataType code = <DataType><int>code_object
    # Lists and tuples are read in place; other sequences item by item, which for a protobuf repeated
    # field is about three times faster than copying it into a list first; anything else becomes a list.
    cdef bint fast = PyList_CheckExact(values) or PyTuple_CheckExact(values) or not PySequence_Check(values)
    cdef object sequence = PySequence_Fast(values, b"values must be a sequence") if fast else values
    cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence) if fast else PySequence_Size(sequence)
    cdef bytes raw = PyBytes_FromStringAndSize(NULL, count * _ITEMSIZE[<int>code])
    cdef char* dest = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t i
    cdef float as_float
    cdef double as_double
    cdef int16_t as_int16
    cdef int32_t as_int32
    cdef int64_t as_int64
    cdef uint16_t as_uint16
    cdef uint32_t as_uint32
    cdef uint64_t as_uint64
    # One loop per type keeps the per-element work to a conversion and a store (memcpy of a constant
    # size compiles to one unaligned move).
    if code == DT_FP32:
        for i in range(count):
            as_float = <float>_as_double(_value(sequence, i, fast))
            memcpy(dest + 4 * i, &as_float, 4)
    elif code == DT_FP64:
        for i in range(count):
            as_double = _as_double(_value(sequence, i, fast))
            memcpy(dest + 8 * i, &as_double, 8)
    elif code == DT_BOOL:
        for i in range(count):
            dest[i] = 1 if PyObject_IsTrue(_value(sequence, i, fast)) else 0
    elif code == DT_INT8:
        for i in range(count):
            dest[i] = <char><int8_t>_signed(_value(sequence, i, fast), code, datatype)
    elif code == DT_UINT8:
        for i in range(count):
            dest[i] = <char><uint8_t>_signed(_value(sequence, i, fast), code, datatype)
    elif code == DT_INT16:
        for i in range(count):
            as_int16 = <int16_t>_signed(_value(sequence, i, fast), code, datatype)
            memcpy(dest + 2 * i, &as_int16, 2)
    elif code == DT_UINT16:
        for i in range(count):
            as_uint16 = <uint16_t>_signed(_value(sequence, i, fast), code, datatype)
            memcpy(dest + 2 * i, &as_uint16, 2)
    elif code == DT_INT32:
        for i in range(count):
            as_int32 = <int32_t>_signed(_value(sequence, i, fast), code, datatype)
            memcpy(dest + 4 * i, &as_int32, 4)
    elif code == DT_UINT32:
        for i in range(count):
            as_uint32 = <uint32_t>_signed(_value(sequence, i, fast), code, datatype)
            memcpy(dest + 4 * i, &as_uint32, 4)
    elif code == DT_INT64:
        for i in range(count):
            as_int64 = _signed(_value(sequence, i, fast), code, datatype)
            memcpy(dest + 8 * i, &as_int64, 8)
    else:  # DT_UINT64
        for i in range(count):
            as_uint64 = _unsigned64(_value(sequence, i, fast), datatype)
            memcpy(dest + 8 * i, &as_uint64, 8)
    return raw


cpdef bytes bytes_typed_to_raw(object values):
    """Typed BYTES contents as a raw BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    cdef object sequence = PySequence_Fast(values, b"values must be a sequence of bytes-like objects")
    cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence)
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t i, size
    cdef Py_buffer element
    cdef object item
    for i in range(count):
        item = _fast_item(sequence, i)
        if PyBytes_CheckExact(item):
            size = PyBytes_GET_SIZE(item)
        else:
            PyObject_GetBuffer(item, &element, PyBUF_SIMPLE)
            size = element.len
            PyBuffer_Release(&element)
        if size > UINT32_MAX:
            raise ValueError(f"BYTES element {i} holds {size} bytes; a raw BYTES length is at most {UINT32_MAX}")
        total += 4 + size
    cdef bytes raw = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dest = PyBytes_AS_STRING(raw)
    cdef char* end = dest + total
    cdef uint32_t length
    for i in range(count):
        item = _fast_item(sequence, i)
        if PyBytes_CheckExact(item):
            size = PyBytes_GET_SIZE(item)
            if size > end - dest - 4:
                raise RuntimeError("a BYTES element changed size while it was being serialized")
            length = <uint32_t>size
            memcpy(dest, &length, 4)
            memcpy(dest + 4, PyBytes_AS_STRING(item), size)
        else:
            PyObject_GetBuffer(item, &element, PyBUF_SIMPLE)
            try:
                size = element.len
                if size > end - dest - 4:
                    raise RuntimeError("a BYTES element changed size while it was being serialized")
                length = <uint32_t>size
                memcpy(dest, &length, 4)
                memcpy(dest + 4, element.buf, size)
            finally:
                PyBuffer_Release(&element)
        dest += 4 + size
    return raw


# --------------------------------------------------------------------------------------------- scatter

cdef object _byte_view(object buffer):
    """A flat unsigned-byte memoryview of `buffer` (slices of it keep `buffer` as their `.obj`)."""
    cdef object view = PyMemoryView_FromObject(buffer)
    cdef Py_buffer* info = PyMemoryView_GET_BUFFER(view)
    if info.ndim == 1 and info.format != NULL and info.format[0] == b"B" and info.format[1] == 0 \
            and info.strides != NULL and info.strides[0] == 1 and info.suboffsets == NULL:
        return view  # what tensorgate_byte_slice requires
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B")


cdef Py_ssize_t* _counts(object sequence, Py_ssize_t count, str what) except NULL:
    """The counts as a C array (PyMem_Free it); each must be a non-negative integer."""
    cdef Py_ssize_t* counts = <Py_ssize_t*>PyMem_Malloc((count + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t i
    if counts == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            counts[i] = PyNumber_Index(_fast_item(sequence, i))
            if counts[i] < 0:
                raise ValueError(f"{what}[{i}] is negative ({counts[i]})")
    except BaseException:
        PyMem_Free(counts)
        raise
    return counts


cpdef list scatter(object buffer, object row_counts, Py_ssize_t row_bytes):
    """Split a batched fixed-size tensor by rows into zero-copy memoryview slices of `buffer`.

    Raises ValueError unless sum(row_counts) * row_bytes == len(buffer) in bytes.
    """
    cdef object view = _byte_view(buffer)
    cdef Py_ssize_t size = PyMemoryView_GET_BUFFER(view).len
    cdef object sequence = PySequence_Fast(row_counts, b"row_counts must be a sequence of integers")
    cdef Py_ssize_t requests = PySequence_Fast_GET_SIZE(sequence)
    cdef Py_ssize_t* counts
    cdef Py_ssize_t i, rows = 0, start = 0, stop
    cdef list slices = []
    if row_bytes < 0:
        raise ValueError(f"row_bytes is negative ({row_bytes})")
    counts = _counts(sequence, requests, "row_counts")
    try:
        for i in range(requests):
            # Checked before adding, so the row total cannot overflow on absurd counts.
            if counts[i] > INT64_MAX - rows:
                rows = -1
                break
            rows += counts[i]
        if rows < 0 or (row_bytes and rows > size // row_bytes) or rows * row_bytes != size:
            raise ValueError(
                f"sum(row_counts) * row_bytes = {sum(sequence)} * {row_bytes} does not match the {size}-byte buffer"
            )
        for i in range(requests):
            stop = start + counts[i] * row_bytes
            slices.append(tensorgate_byte_slice(view, start, stop))
            start = stop
        return slices
    finally:
        PyMem_Free(counts)


cdef enum WalkError:
    WALK_OK, WALK_TRUNCATED_PREFIX, WALK_LENGTH_PAST_END


cdef struct Walk:
    Py_ssize_t offset    # where the walk stopped: the buffer size when it succeeded
    Py_ssize_t request   # on error: the request and element being read
    Py_ssize_t element
    uint32_t length      # on WALK_LENGTH_PAST_END: the corrupt length
    WalkError error


cdef void _walk_bytes(const unsigned char* data, Py_ssize_t size, const Py_ssize_t* counts,
                      Py_ssize_t requests, Py_ssize_t* ends, Walk* walk) noexcept nogil:
    """Walk the length prefixes, storing where each request's elements end; never reads past `size`.

    The state lives in locals and reaches `walk` only on exit: stores through a pointer that may alias
    `data` would otherwise sit in the one serial chain (load a length, add it, load the next).
    """
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t last_prefix = size - 4  # the highest offset a whole length prefix can start at
    cdef Py_ssize_t request, element, count
    cdef uint32_t length
    walk.error = WALK_OK
    for request in range(requests):
        count = counts[request]
        for element in range(count):
            if offset > last_prefix:
                walk.error = WALK_TRUNCATED_PREFIX
                break
            memcpy(&length, data + offset, 4)
            if <Py_ssize_t>length > last_prefix - offset:
                walk.error = WALK_LENGTH_PAST_END
                walk.length = length
                break
            offset += 4 + <Py_ssize_t>length
        if walk.error != WALK_OK:
            walk.request = request
            walk.element = element
            break
        ends[request] = offset
    walk.offset = offset


cpdef list scatter_bytes(object buffer, object element_counts):
    """Split a batched raw BYTES tensor into zero-copy slices of element_counts[i] elements each.

    A length prefix that runs past the end, a truncated prefix, too few elements or leftover bytes
    raise ValueError with the offset; nothing outside `buffer` is ever read.
    """
    cdef object view = _byte_view(buffer)
    cdef const unsigned char[::1] data = view
    cdef Py_ssize_t size = data.shape[0]
    cdef object sequence = PySequence_Fast(element_counts, b"element_counts must be a sequence of integers")
    cdef Py_ssize_t requests = PySequence_Fast_GET_SIZE(sequence)
    cdef Py_ssize_t* counts = _counts(sequence, requests, "element_counts")
    cdef Py_ssize_t* ends = NULL
    cdef Py_ssize_t i, start = 0
    cdef const unsigned char* base = &data[0] if size else NULL
    cdef Walk walk
    cdef list slices = []
    try:
        ends = <Py_ssize_t*>PyMem_Malloc((requests + 1) * sizeof(Py_ssize_t))
        if ends == NULL:
            raise MemoryError()
        if size >= NOGIL_BYTES:
            with nogil:
                _walk_bytes(base, size, counts, requests, ends, &walk)
        else:
            _walk_bytes(base, size, counts, requests, ends, &walk)
        if walk.error == WALK_TRUNCATED_PREFIX:
            raise ValueError(
                f"BYTES buffer truncated: request {walk.request} element {walk.element} needs a 4-byte length"
                f" prefix at offset {walk.offset} but only {size - walk.offset} bytes remain"
            )
        if walk.error == WALK_LENGTH_PAST_END:
            raise ValueError(
                f"corrupt BYTES length {walk.length} at offset {walk.offset} (request {walk.request} element"
                f" {walk.element}): it runs past the end of the {size}-byte buffer"
            )
        if walk.offset != size:
            raise ValueError(
                f"{size - walk.offset} leftover bytes at offset {walk.offset} after the {sum(sequence)}"
                f" BYTES elements of {requests} requests"
            )
        for i in range(requests):
            slices.append(tensorgate_byte_slice(view, start, ends[i]))
            start = ends[i]
        return slices
    finally:
        PyMem_Free(counts)
        PyMem_Free(ends)
