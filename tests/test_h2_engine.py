"""The h2 engine's HTTP/2 server (ext/h2server.pyx under gateway/server/engines/h2.py), held to what
only it does: a real engine on a real port, stock grpc clients, Methods written for each case.

The gateway's own behaviour on this engine (the protocol suite, TLS, limits, drain, workers) is in
the engine-parametrized tests; these are the server's own promises: a reset stream cancels its call
at once, what a client can make it hold unread is bounded by the connection window, a window is
given back however a stream ends, refused uploads cost the connection nothing, and a client that
does not speak HTTP/2 is closed without harm to anyone else.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
import uvloop

from gateway.server.engines.h2 import H2Engine
from gateway.server.rpc import Method
from tests.waiting import wait_until_async

TEST_S = 60
CONNECTION_WINDOW = 256 * 1024
STREAM_WINDOW = 128 * 1024


class Probe:
    """Methods that record what happened to them."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def hang(self, request: bytes, call) -> bytes:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def echo(self, request: bytes, call) -> bytes:
        return bytes(request[:16])

    async def never_read(self, requests, call):
        self.started.set()
        await asyncio.sleep(3600)
        yield b""

    def methods(self) -> list[Method]:
        return [Method("/t.T/Hang", False, self.hang), Method("/t.T/Echo", False, self.echo),
                Method("/t.T/NeverRead", True, self.never_read)]


def run(test):
    """Run `test(engine, probe, target)` on uvloop against an h2 engine with small windows."""

    async def main():
        probe = Probe()
        engine = H2Engine("127.0.0.1:0", probe.methods(), max_message_bytes=1 << 20,
                          stream_window_bytes=STREAM_WINDOW, connection_window_bytes=CONNECTION_WINDOW)
        port = await engine.start()
        try:
            # Bounded: a broken window would leave a call waiting for flow control for good.
            return await asyncio.wait_for(test(engine, probe, f"127.0.0.1:{port}"), TEST_S)
        finally:
            await asyncio.wait_for(engine.stop(0), 10)

    return uvloop.run(main())


def test_a_client_that_resets_its_stream_has_its_call_cancelled_at_once():
    async def test(engine, probe, target):
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/t.T/Hang")(b"x")
            await asyncio.wait_for(probe.started.wait(), 10)
            call.cancel()
            # No polling on this engine (poll_s=None): only the server's own reaction to the
            # RST_STREAM can cancel the handler.
            await asyncio.wait_for(probe.cancelled.wait(), 10)
            await wait_until_async(engine.open_streams, "the reset stream closed", timeout=10,
                                   accept=lambda streams: streams == 0)

    run(test)


def test_what_a_client_makes_the_server_hold_unread_is_bounded_by_the_connection_window():
    """Eight streams whose handler never reads: the client can push no more than the connection
    window between them (each stream alone could take its stream window, 8 × 128 KiB > 256 KiB)."""

    async def test(engine, probe, target):
        async with grpc.aio.insecure_channel(target) as channel:
            chunk = b"z" * (32 * 1024)

            async def push(call):
                for _ in range(64):  # 2 MiB per stream, far beyond any window
                    await call.write(chunk)

            calls = [channel.stream_stream("/t.T/NeverRead")() for _ in range(8)]
            writers = [asyncio.ensure_future(push(call)) for call in calls]
            await asyncio.sleep(2.0)  # the client writes until flow control stops it
            unread = sum(connection.unread_bytes for connection in engine.connections)
            assert 0 < unread <= CONNECTION_WINDOW, unread
            assert not all(writer.done() for writer in writers)
            for writer in writers:
                writer.cancel()
            for call in calls:
                call.cancel()

    run(test)


def test_reset_streams_give_their_unread_bytes_back_to_the_connection():
    """Streams reset with bytes the app never read: the connection's window is given back, so the
    next call on the same connection goes through (without it the window would be spent)."""

    async def test(engine, probe, target):
        async with grpc.aio.insecure_channel(target) as channel:
            for _ in range(6):  # 6 × ~100 KiB unread, reset: more than the 256 KiB window in all
                call = channel.stream_stream("/t.T/NeverRead")()
                await call.write(b"y" * (100 * 1024))
                await asyncio.sleep(0.1)
                call.cancel()
            # The last RST_STREAM leaves from grpc's own thread: wait for the server to read it.
            await wait_until_async(lambda: sum(connection.unread_bytes for connection in engine.connections),
                                   "the reset streams' bytes given back", timeout=10, accept=lambda unread: unread == 0)
            answer = await channel.unary_unary("/t.T/Echo")(b"w" * (200 * 1024), timeout=10)
            assert answer == b"w" * 16

    run(test)


def test_refused_uploads_keep_the_connection():
    """2,000 requests refused from their length prefix while their bytes are still coming: each is
    answered RESOURCE_EXHAUSTED and the stream stopped by the server (RST_STREAM(NO_ERROR)), so the
    client resets none itself and libnghttp2's reset limit never closes the connection."""

    async def test(engine, probe, target):
        async with grpc.aio.insecure_channel(target) as channel:
            echo = channel.unary_unary("/t.T/Echo")
            codes = set()

            async def refused():
                for _ in range(250):
                    try:
                        await echo(b"v" * ((1 << 20) + 1), timeout=30)
                    except grpc.aio.AioRpcError as error:
                        codes.add(error.code())

            await asyncio.gather(*(refused() for _ in range(8)))
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert await echo(b"ok", timeout=10) == b"ok"
            assert len(engine.connections) == 1  # the one connection, never replaced

    run(test)


def test_a_client_that_does_not_speak_http2_is_closed_and_others_are_served():
    async def test(engine, probe, target):
        host, port = target.rsplit(":", 1)
        loop = asyncio.get_running_loop()

        def http1() -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                return received

        answer = await loop.run_in_executor(None, http1)  # returns once the server closes
        assert b"HTTP/1.1 200" not in answer
        async with grpc.aio.insecure_channel(target) as channel:
            assert await channel.unary_unary("/t.T/Echo")(b"fine", timeout=10) == b"fine"

    run(test)


def test_a_header_list_over_the_limit_resets_only_its_own_stream():
    """libnghttp2 only advertises SETTINGS_MAX_HEADER_LIST_SIZE; the server enforces it (64 KiB by
    default): a call with 100 KiB of metadata is reset, the next call on the connection is served."""

    async def test(engine, probe, target):
        async with grpc.aio.insecure_channel(target) as channel:
            echo = channel.unary_unary("/t.T/Echo")
            big = tuple((f"x-pad-{i}", "p" * 1000) for i in range(100))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo(b"a", metadata=big, timeout=10)
            assert refused.value.code() is not grpc.StatusCode.DEADLINE_EXCEEDED
            assert await echo(b"fine", metadata=big[:10], timeout=10) == b"fine"  # 10 KiB is within it
            assert len(engine.connections) == 1

    run(test)
