"""Plain-Python twin of tensorcheck.pyx, same signatures; used when extensions are off."""

from __future__ import annotations

import struct

_LENGTH = struct.Struct("<I")


def bytes_element_count(data: bytes | memoryview) -> int:
    """Elements of a raw BYTES tensor (4-byte little-endian length prefixes), or -1 if corrupt."""
    size = len(data)
    offset = 0
    count = 0
    while offset < size:
        if size - offset < 4:
            return -1
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if length > size - offset:
            return -1
        offset += length
        count += 1
    return count


def bytes_longest_element(data: bytes | memoryview) -> int:
    """Length of the longest element of a raw BYTES tensor (0 if none), or -1 if corrupt."""
    size = len(data)
    offset = 0
    longest = 0
    while offset < size:
        if size - offset < 4:
            return -1
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if length > size - offset:
            return -1
        offset += length
        longest = max(longest, length)
    return longest
