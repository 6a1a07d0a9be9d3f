from collections.abc import Iterable, Sequence
from typing import SupportsFloat, SupportsIndex

from typing_extensions import Buffer

DATATYPE_ITEMSIZE: dict[str, int]
"""Bytes per element of each datatype typed_to_raw converts."""

def gather(parts: Iterable[Buffer]) -> bytearray:
    """Concatenate the raw tensor bytes of N requests into one new buffer: one allocation, one memcpy per part."""

def gather_into(parts: Iterable[Buffer], out: Buffer, offset: int = 0) -> int:
    """Concatenate the parts into the writable buffer `out` at `offset`; returns the end offset (ValueError if they do not fit)."""

def typed_to_raw(values: Sequence[SupportsFloat | SupportsIndex | bool], datatype: str) -> bytes:
    """Typed contents of one tensor as raw little-endian bytes of `datatype`; ValueError on out-of-range integers."""

def bytes_typed_to_raw(values: Sequence[Buffer]) -> bytes:
    """Typed BYTES contents as a raw BYTES tensor: each element a 4-byte little-endian length, then its bytes."""

def scatter(buffer: Buffer, row_counts: Sequence[SupportsIndex], row_bytes: int) -> list[memoryview]:
    """Split a batched fixed-size tensor by rows into zero-copy memoryview slices of `buffer`."""

def scatter_bytes(buffer: Buffer, element_counts: Sequence[SupportsIndex]) -> list[memoryview]:
    """Split a batched raw BYTES tensor into zero-copy slices of element_counts[i] elements each (ValueError if corrupt)."""
