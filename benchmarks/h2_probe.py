"""A probe, not a transport: unary gRPC ModelInfer over one multiplexed HTTP/2 connection, lean.

Measures what a lean HTTP/2 upstream to Triton's gRPC port would cost the gateway, against the
HTTP/1.1 REST client it uses (bench_upstream.py's client section, transport `h2-probe`). What
makes it cheap, and what a real transport would keep:

- one connection for every request in flight: the frames of every request a loop turn sends go out
  in one write, and answers arrive several to a read (HTTP/1.1 needs a connection per request in
  flight, a write and a read each);
- the client's protobuf bytes go upstream as they are and Triton's come back as they are (the REST
  path re-encodes both ways);
- HPACK with the dynamic table at size 0 (SETTINGS_HEADER_TABLE_SIZE): Triton then encodes its
  headers and trailers the same way every time, so a header block's meaning depends on its bytes
  alone and is decoded once, then looked up.

What it lacks, and a transport must have: send-side flow control (it writes each request whole, so
only requests under the server's 64 KiB initial window are safe), Huffman-coded header strings,
CONTINUATION frames, cancellation (RST_STREAM), GOAWAY handling beyond failing, TLS, deadlines
(`grpc-timeout` is a constant 30 s here), per-request trace context, reconnecting.
"""

from __future__ import annotations

import asyncio
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8  # frame types
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20  # frame flags
#: The entries of HPACK's static table (RFC 7541, appendix A) that gRPC answers use.
STATIC = {1: b":authority", 2: (b":method", b"GET"), 3: (b":method", b"POST"), 4: (b":path", b"/"),
          6: (b":scheme", b"http"), 7: (b":scheme", b"https"), 8: (b":status", b"200"), 31: b"content-type",
          9: (b":status", b"204"), 13: (b":status", b"404"), 14: (b":status", b"500")}


def _int(block, i, prefix):
    """An HPACK integer with a `prefix`-bit prefix at block[i]: (value, the index after it)."""
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _str(block, i):
    """An HPACK string literal at block[i] (Huffman-coded ones are not decoded by the probe)."""
    huff = block[i] & 0x80
    n, i = _int(block, i, 7)
    if huff:
        raise NotImplementedError("huffman")
    return bytes(block[i:i + n]), i + n


def decode_block(block: bytes) -> list:
    """HPACK with the dynamic table at size 0: context-free, so a block's meaning depends on its bytes."""
    out, i = [], 0
    while i < len(block):
        b = block[i]
        if b & 0x80:
            idx, i = _int(block, i, 7)
            out.append(STATIC[idx])
        elif b & 0x40 or (b & 0xF0) in (0x00, 0x10):
            idx, i = _int(block, i, 6 if b & 0x40 else 4)
            if idx:
                entry = STATIC[idx]
                name = entry if isinstance(entry, bytes) else entry[0]
            else:
                name, i = _str(block, i)
            value, i = _str(block, i)
            out.append((name, value))
        elif b & 0x20:
            _, i = _int(block, i, 5)  # table size update
        else:
            raise ValueError(hex(b))
    return out


def _literal(name_index: int, value: bytes) -> bytes:
    """An HPACK literal without indexing, its name from the static table (index < 15, value < 127 bytes)."""
    assert name_index < 15 and len(value) < 127
    return bytes((name_index, len(value))) + value


class H2Client(asyncio.Protocol):
    """Unary gRPC calls to one `path` on one HTTP/2 connection: `request(message bytes)` → a future
    of the answer's message bytes (a RuntimeError with the trailers for a gRPC error)."""

    def __init__(self, authority: bytes, path: bytes):
        self.loop = asyncio.get_running_loop()
        self.streams = {}  # stream id -> [future, DATA payloads]
        self.next_id = 1
        self.out = []  # frames to write on the next loop turn, in one write
        self.buf = b""  # an incomplete frame, kept for the next read
        self.memo = {}  # header block bytes -> {name: value}
        self.received = 0  # DATA bytes since the last connection WINDOW_UPDATE
        # :method POST, :scheme http (static), :path, :authority, content-type, te, grpc-timeout
        self.header_block = (b"\x83\x86" + _literal(4, path) + _literal(1, authority) +
                             b"\x0f\x10\x10application/grpc" + b"\x00\x02te\x08trailers" +
                             b"\x00\x0cgrpc-timeout\x0330S")

    def connection_lost(self, exc):
        for future, _ in self.streams.values():
            if not future.done():
                future.set_exception(ConnectionError("h2 connection lost"))
        self.streams.clear()

    def connection_made(self, transport):
        self.transport = transport
        # HEADER_TABLE_SIZE 0 (no dynamic table), ENABLE_PUSH 0, INITIAL_WINDOW_SIZE 2^31-1 (answers
        # never wait on a stream window); the connection's window opened as far as it goes.
        settings = struct.pack(">HIHIHI", 1, 0, 2, 0, 4, 2**31 - 1)
        transport.write(PREFACE + self._frame(SETTINGS, 0, 0, settings) +
                        self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))

    @staticmethod
    def _frame(kind, flags, stream, payload):
        return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload

    def request(self, message: bytes) -> asyncio.Future:
        stream = self.next_id
        self.next_id += 2
        block = self.header_block
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        self.out.append(len(block).to_bytes(3, "big") + bytes((HEADERS, END_HEADERS)) + stream.to_bytes(4, "big") +
                        block + len(body).to_bytes(3, "big") + bytes((DATA, END_STREAM)) + stream.to_bytes(4, "big") +
                        body)
        if len(self.out) == 1:
            self.loop.call_soon(self._flush)
        future = self.loop.create_future()
        self.streams[stream] = [future, []]
        return future

    def _flush(self):
        self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        i, n = 0, len(buf)
        while n - i >= 9:
            length = int.from_bytes(buf[i:i + 3], "big")
            if n - i - 9 < length:
                break
            kind, flags = buf[i + 3], buf[i + 4]
            stream = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
            payload = buf[i + 9:i + 9 + length]
            i += 9 + length
            if kind == DATA:
                self.received += length
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                self.streams[stream][1].append(payload)
                if flags & END_STREAM:
                    self._end(stream, None)
            elif kind == HEADERS:  # the answer's headers, or its trailers (END_STREAM)
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
                headers = self.memo.get(payload)
                if headers is None:
                    headers = self.memo[payload] = dict(decode_block(payload))
                if flags & END_STREAM:
                    self._end(stream, headers)
            elif kind == SETTINGS and not flags & ACK:
                self.transport.write(self._frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                self.transport.write(self._frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                entry = self.streams.pop(stream, None)
                if entry:
                    entry[0].set_exception(RuntimeError("reset"))
            elif kind == GOAWAY:
                raise RuntimeError(f"goaway {payload!r}")
        self.buf = buf[i:] if i < n else b""
        if self.received > 2**30:
            self.transport.write(self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0

    def _end(self, stream, trailers):
        future, chunks = self.streams.pop(stream)
        if trailers is not None and trailers.get(b"grpc-status", b"0") != b"0":
            future.set_exception(RuntimeError(trailers))
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        future.set_result(body[5:])
