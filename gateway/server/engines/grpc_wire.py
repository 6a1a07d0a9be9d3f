"""gRPC over HTTP/2, the pieces an engine below gRPC needs: framing, timeouts, status, compression.

Written from the gRPC over HTTP/2 specification (PROTOCOL-HTTP2.md) for an engine that sees
HTTP/2 requests as ASGI events (gateway/server/engines/grpc_asgi.py):

- a message travels as a 5-byte prefix (compressed flag, big-endian length) and its bytes;
  `MessageDecoder` takes body chunks as they come and gives back whole messages, refusing one
  over the size limit from its prefix, before a byte of it is buffered;
- `grpc-timeout` is 1-8 digits and a unit (H M S m u n);
- `grpc-message` is percent-encoded UTF-8;
- `grpc-encoding` names the request's compression (identity, gzip, deflate); responses go out
  uncompressed, which every client accepts.

Everything that ends a call for a protocol reason raises `WireError`, which carries its status.
"""

from __future__ import annotations

import struct
import zlib

import grpc

__all__ = [
    "ACCEPT_ENCODING",
    "MessageDecoder",
    "WireError",
    "frame",
    "inflater",
    "is_grpc_content_type",
    "parse_timeout",
    "percent_decode",
    "percent_encode",
    "status_bytes",
]

_PREFIX = struct.Struct(">BI")
PREFIX_BYTES = _PREFIX.size  # 5

ACCEPT_ENCODING = b"identity,deflate,gzip"
"""What requests may be compressed with (sent as grpc-accept-encoding on every response)."""


class WireError(Exception):
    """A protocol failure that ends the call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"<WireError {self.code.name}: {self.message}>"


_STATUS_BYTES = {code: str(code.value[0]).encode() for code in grpc.StatusCode}


def status_bytes(code: grpc.StatusCode) -> bytes:
    """The grpc-status trailer value of `code` (b"0" for OK)."""
    return _STATUS_BYTES[code]


def prefix(length: int) -> bytes:
    """The uncompressed length prefix of a message of `length` bytes."""
    return _PREFIX.pack(0, length)


def frame(message: bytes) -> bytes:
    """`message` with its uncompressed length prefix, ready to send."""
    return b"".join((_PREFIX.pack(0, len(message)), message))


def is_grpc_content_type(value: bytes | None) -> bool:
    """Whether a request's content-type is gRPC's: application/grpc, +proto, +json, ;params."""
    if value is None or not value.startswith(b"application/grpc"):
        return False
    return len(value) == 16 or value[16:17] in (b"+", b";")


# ---------------------------------------------------------------------------------------- timeout

_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_timeout(value: bytes) -> float:
    """Seconds in a grpc-timeout header value ("100m" → 0.1); raises WireError if malformed."""
    scale = _TIMEOUT_UNITS.get(value[-1]) if value else None
    digits = value[:-1]
    if scale is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        raise WireError(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {value!r}")
    return int(digits) * scale


# ------------------------------------------------------------------------------- grpc-message

_PERCENT = [chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in range(256)]


def percent_encode(message: str) -> bytes:
    """A grpc-message value: UTF-8, with bytes outside printable ASCII (and '%') percent-encoded."""
    if message.isascii() and message.isprintable() and "%" not in message:
        return message.encode("ascii")
    return "".join(_PERCENT[b] for b in message.encode("utf-8")).encode("ascii")


def percent_decode(value: bytes) -> str:
    """The message in a grpc-message value (invalid UTF-8 is replaced, never fatal)."""
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value).decode("utf-8", "replace")


# -------------------------------------------------------------------------------- compression

_WBITS = {b"gzip": (31,), b"deflate": (15, -15)}  # deflate is zlib (RFC 1950); accept raw too


def inflater(encoding: bytes | None, limit: int):
    """The function that decompresses one message sent with grpc-encoding `encoding`, or None
    for identity. Raises WireError UNIMPLEMENTED for an encoding this server does not know."""
    if encoding is None or encoding == b"identity":
        return None
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None:
        raise WireError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"grpc-encoding {encoding.decode('latin-1')!r} is not supported; "
            f"this server accepts {ACCEPT_ENCODING.decode()}",
        )

    def inflate(data: bytes) -> bytes:
        for bits in wbits:
            decompressor = zlib.decompressobj(bits)
            try:
                message = decompressor.decompress(data, limit + 1)
            except zlib.error:
                continue
            if len(message) > limit or decompressor.unconsumed_tail:
                raise WireError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"decompressed request message exceeds the limit of {limit} bytes",
                )
            return message
        raise WireError(grpc.StatusCode.INTERNAL, f"request message is not valid {encoding.decode('latin-1')} data")

    return inflate


# ------------------------------------------------------------------------------------ framing


class MessageDecoder:
    """Whole messages out of a request body fed in chunks of any size.

    `feed(chunk)` returns the messages the chunk completed (often exactly one, with no copy of the
    chunk kept); `finish()` at the end of the body raises if a message was cut short. A prefix that
    announces more than `limit` bytes raises RESOURCE_EXHAUSTED at once, before any of the message
    is kept. Compressed messages are decompressed with `inflate` (see `inflater`); one flagged
    compressed without a grpc-encoding is a protocol error.
    """

    __slots__ = ("limit", "inflate", "_pending", "_need", "_whole", "_filled")

    def __init__(self, limit: int, inflate=None) -> None:
        self.limit = limit
        self.inflate = inflate
        self._pending = bytearray()  # an incomplete message (prefix included) carried over
        self._need = 0  # bytes _pending must reach before it holds one whole message (0: unknown)
        # A message whose length is known and that spans chunks is filled in place into one buffer
        # of exactly its size, and handed out as a view of it: the only copy of its bytes the
        # decoder makes (growing a bytearray and slicing it out cost three times a large message).
        self._whole: bytearray | None = None
        self._filled = 0

    def __repr__(self) -> str:
        return f"<MessageDecoder limit={self.limit} pending={len(self._pending)}/{self._need or '?'}>"

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._whole is not None:
            return self._fill(chunk)
        pending = self._pending
        if pending:
            pending += chunk
            if len(pending) < self._need:
                return []  # a large message still arriving: keep appending, parse nothing
            data = pending
        else:
            data = chunk
        messages = []
        offset = 0
        end = len(data)
        while end - offset >= PREFIX_BYTES:
            flag, length = _PREFIX.unpack_from(data, offset)
            if length > self.limit:
                raise WireError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request message of {length} bytes exceeds the limit of {self.limit} bytes",
                )
            start = offset + PREFIX_BYTES
            if end - start < length:
                break
            message = bytes(data[start : start + length])
            if flag:
                message = self._decompress(flag, message)
            messages.append(message)
            offset = start + length
        self._carry(data, offset, end)
        return messages

    def _fill(self, chunk: bytes) -> list:
        whole, filled = self._whole, self._filled
        take = min(len(chunk), len(whole) - filled)
        whole[filled:filled + take] = memoryview(chunk)[:take]
        filled += take
        self._filled = filled
        if filled < len(whole):
            return []
        self._whole = None
        message = memoryview(whole)[PREFIX_BYTES:]
        messages = [self._decompress(whole[0], message) if whole[0] else message]
        if take < len(chunk):  # more messages after it in the same chunk (rare)
            messages += self.feed(bytes(memoryview(chunk)[take:]))
        return messages

    def _carry(self, data, offset: int, end: int) -> None:
        if offset == end:
            if self._pending:
                self._pending = bytearray()
            self._need = 0
            return
        if end - offset >= PREFIX_BYTES:
            need = PREFIX_BYTES + _PREFIX.unpack_from(data, offset)[1]
            if need > end - offset:  # a message cut by the chunk's end: fill it in place from here on
                whole = bytearray(need)
                whole[:end - offset] = memoryview(data)[offset:end]
                self._whole, self._filled = whole, end - offset
                self._pending = bytearray()
                self._need = 0
                return
        if data is not self._pending or offset:
            self._pending = bytearray(data[offset:end])
        if end - offset >= PREFIX_BYTES:
            self._need = PREFIX_BYTES + _PREFIX.unpack_from(self._pending, 0)[1]
        else:
            self._need = PREFIX_BYTES

    def _decompress(self, flag: int, message: bytes) -> bytes:
        if flag != 1:
            raise WireError(grpc.StatusCode.INTERNAL, f"invalid compressed-flag {flag} in a message prefix")
        if self.inflate is None:
            raise WireError(
                grpc.StatusCode.INTERNAL, "a message is flagged compressed but the request has no grpc-encoding"
            )
        return self.inflate(message)

    def finish(self) -> None:
        """The body ended: raise if it ended inside a message."""
        if self._whole is not None:
            raise WireError(
                grpc.StatusCode.INTERNAL,
                f"request body ended inside a message ({self._filled} of {len(self._whole)} bytes of a prefixed message)",
            )
        if self._pending:
            raise WireError(
                grpc.StatusCode.INTERNAL,
                f"request body ended inside a message ({len(self._pending)} bytes of a prefixed message)",
            )
