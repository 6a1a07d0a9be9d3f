# cython: language_level=3
"""Validation of tensor bytes before a request may travel: BYTES element walks, bounds-checked."""

from libc.stdint cimport uint32_t
from libc.string cimport memcpy


cpdef Py_ssize_t bytes_element_count(const unsigned char[::1] data) except -2:
    """Count the 4-byte-length-prefixed elements of a raw BYTES tensor.

    Returns the element count, or -1 when the buffer is corrupt (a length runs past the end, or a
    partial length prefix is left over). Never reads outside `data`.
    """
    cdef Py_ssize_t size = data.shape[0]
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t count = 0
    cdef uint32_t length
    while offset < size:
        if size - offset < 4:
            return -1
        memcpy(&length, &data[offset], 4)  # little-endian on every platform Triton supports
        offset += 4
        if <Py_ssize_t>length > size - offset:
            return -1
        offset += length
        count += 1
    return count


cpdef Py_ssize_t bytes_longest_element(const unsigned char[::1] data) except -2:
    """The length of the longest element of a raw BYTES tensor (0 when it has none).

    Returns -1 when the buffer is corrupt, as bytes_element_count does. Never reads outside `data`.
    """
    cdef Py_ssize_t size = data.shape[0]
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t longest = 0
    cdef uint32_t length
    while offset < size:
        if size - offset < 4:
            return -1
        memcpy(&length, &data[offset], 4)
        offset += 4
        if <Py_ssize_t>length > size - offset:
            return -1
        offset += length
        if <Py_ssize_t>length > longest:
            longest = length
    return longest
