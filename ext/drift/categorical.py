"""Hashed frequency buckets of categorical features: integer categories and KServe BYTES elements.

Counts of F features over K buckets: `counts: int64[F, K]`. A category goes to bucket hash(value) % K,
so no vocabulary is kept and unseen categories still count; distinct categories may share a bucket
(the chi-square / PSI / JS statistics then see their sum). Integers are hashed with the splitmix64
finalizer of their 64-bit two's-complement value; BYTES elements with FNV-1a 64 over their bytes.

A raw KServe BYTES buffer holds its elements back to back, each a 4-byte little-endian length then
that many bytes, laid out row-major [R, F]. `update_bytes_buckets` reads the length prefixes first and
raises ValueError, before counting anything, if a length runs past the end of the buffer or the
element count is not a multiple of F: a corrupt buffer is never read out of bounds and never counted
in part.
"""

from __future__ import annotations

import numba
import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


@numba.njit(nogil=True, cache=True)
def _splitmix64(value):
    value = np.uint64(value) + np.uint64(0x9E3779B97F4A7C15)
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def update_buckets(counts, values):
    """Add integer categories `values[R, F]` to `counts[F, K]` in place; returns `counts`."""
    features = counts.shape[0]
    buckets = np.uint64(counts.shape[1])
    if counts.shape[1] < 1 or values.shape[1] != features:
        raise ValueError("bucket shapes must be counts int64[F, K] (K >= 1) and values [R, F]")
    for row in range(values.shape[0]):
        for feature in range(features):
            counts[feature, _splitmix64(np.int64(values[row, feature])) % buckets] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def _bytes_elements(raw):
    """Number of elements in a raw BYTES buffer, or -1 if a length prefix or element overruns it."""
    size = raw.shape[0]
    position = 0
    elements = 0
    while position < size:
        if size - position < 4:
            return -1
        length = (np.int64(raw[position]) | (np.int64(raw[position + 1]) << 8)
                  | (np.int64(raw[position + 2]) << 16) | (np.int64(raw[position + 3]) << 24))
        position += 4
        if length > size - position:
            return -1
        position += length
        elements += 1
    return elements


@numba.njit(nogil=True, cache=True)
def update_bytes_buckets(counts, raw):
    """Add the BYTES elements of `raw` (uint8[N], row-major [R, F]) to `counts[F, K]`; returns `counts`."""
    features = counts.shape[0]
    if features < 1 or counts.shape[1] < 1:
        raise ValueError("bucket shapes must be counts int64[F, K] with F, K >= 1")
    elements = _bytes_elements(raw)
    if elements < 0:
        raise ValueError("corrupt BYTES buffer: an element's length runs past the end of the buffer")
    if elements % features != 0:
        raise ValueError("BYTES buffer: the element count is not a multiple of the feature count")
    buckets = np.uint64(counts.shape[1])
    position = 0
    for element in range(elements):
        length = (np.int64(raw[position]) | (np.int64(raw[position + 1]) << 8)
                  | (np.int64(raw[position + 2]) << 16) | (np.int64(raw[position + 3]) << 24))
        position += 4
        digest = FNV_OFFSET
        for index in range(position, position + length):
            digest = (digest ^ np.uint64(raw[index])) * FNV_PRIME
        position += length
        counts[element % features, digest % buckets] += 1
    return counts


def as_raw(buffer) -> np.ndarray:
    """A zero-copy uint8 view of a bytes-like BYTES buffer, as `update_bytes_buckets` takes it."""
    return np.frombuffer(buffer, np.uint8) if not isinstance(buffer, np.ndarray) else buffer.view(np.uint8).reshape(-1)


# ------------------------------------------------------------------------------------------ NumPy twins

_MASK = (1 << 64) - 1


def _splitmix64_numpy(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        value = values.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return value ^ (value >> np.uint64(31))


def update_buckets_numpy(counts, values):
    """NumPy twin of `update_buckets`."""
    values = np.asarray(values)
    if counts.shape[1] < 1 or values.ndim != 2 or values.shape[1] != counts.shape[0]:
        raise ValueError("bucket shapes must be counts int64[F, K] (K >= 1) and values [R, F]")
    buckets = counts.shape[1]
    for feature in range(counts.shape[0]):
        index = (_splitmix64_numpy(values[:, feature]) % np.uint64(buckets)).astype(np.int64)
        counts[feature] += np.bincount(index, minlength=buckets)
    return counts


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64 of `data` (plain Python)."""
    digest = int(FNV_OFFSET)
    for byte in data:
        digest = ((digest ^ byte) * int(FNV_PRIME)) & _MASK
    return digest


def update_bytes_buckets_numpy(counts, raw):
    """Plain-Python twin of `update_bytes_buckets` (same validation, same buckets)."""
    data = bytes(as_raw(raw))
    features, buckets = counts.shape
    if features < 1 or buckets < 1:
        raise ValueError("bucket shapes must be counts int64[F, K] with F, K >= 1")
    elements, position = [], 0
    while position < len(data):
        if len(data) - position < 4:
            raise ValueError("corrupt BYTES buffer: an element's length runs past the end of the buffer")
        length = int.from_bytes(data[position:position + 4], "little")
        position += 4
        if length > len(data) - position:
            raise ValueError("corrupt BYTES buffer: an element's length runs past the end of the buffer")
        elements.append(data[position:position + length])
        position += length
    if len(elements) % features:
        raise ValueError("BYTES buffer: the element count is not a multiple of the feature count")
    for index, element in enumerate(elements):
        counts[index % features, fnv1a64(element) % buckets] += 1
    return counts
