"""The envoy engine with real components only: Envoy (pyvoy) serving tests/envoy_engine_methods.py,
called by stock grpc (sync and aio) and tritonclient clients, and by a plain HTTP/2 client where the
bytes on the wire matter (trailers-only responses, a server-side deadline, HTTP 415).

The grpc_wire unit tests at the top need no server.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import queue
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("pyvoy", reason="the envoy engine needs pyvoy (Python 3.11+)")

from pyqwest import HTTPVersion, SyncClient, SyncHTTPTransport  # noqa: E402 - pyvoy's own HTTP client

from gateway.child_process import ChildProcess  # noqa: E402
from gateway.server.engines import grpc_wire  # noqa: E402
from gateway.server.engines.envoy_server import EnvoyEngine, EnvoyOptions  # noqa: E402
from gateway.server.engines.grpc_wire import MessageDecoder, WireError  # noqa: E402
from gateway.server.engines.watch import DEADLINE, DISCONNECT, CallWatch  # noqa: E402
from tests.envoy_engine_methods import SERVICE, STATUS_MESSAGE  # noqa: E402
from tests.waiting import process_running, wait_until  # noqa: E402

LIMIT = 1024 * 1024  # the test engine's max_receive_bytes
METHODS = "tests.envoy_engine_methods:build"


def path(name: str) -> str:
    return f"/{SERVICE}/{name}"


# ------------------------------------------------------------------------------ grpc_wire units


def prefixed(message: bytes, flag: int = 0) -> bytes:
    return bytes((flag,)) + len(message).to_bytes(4, "big") + message


def test_decoder_gives_whole_messages_from_any_chunking():
    rng = random.Random(7)
    messages = [rng.randbytes(rng.choice((0, 1, 5, 100, 70_000))) for _ in range(40)]
    stream = b"".join(prefixed(m) for m in messages)
    for _ in range(20):
        decoder, got, offset = MessageDecoder(LIMIT), [], 0
        while offset < len(stream):
            step = rng.choice((1, 3, 5, 6, 1000, 100_000))
            got += decoder.feed(stream[offset : offset + step])
            offset += step
        decoder.finish()
        assert got == messages


def test_decoder_refuses_an_oversize_message_from_its_prefix_alone():
    decoder = MessageDecoder(1000)
    with pytest.raises(WireError) as refused:
        decoder.feed(prefixed(b"x" * 1001)[:5])  # only the prefix has arrived
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001 bytes exceeds the limit of 1000" in refused.value.message


def test_decoder_reports_a_body_cut_inside_a_message():
    decoder = MessageDecoder(LIMIT)
    assert decoder.feed(prefixed(b"abcdef")[:8]) == []
    with pytest.raises(WireError, match="ended inside a message"):
        decoder.finish()


def test_decoder_decompresses_flagged_messages_and_limits_what_they_inflate_to():
    inflate = grpc_wire.inflater(b"gzip", 1000)
    decoder = MessageDecoder(1000, inflate)
    assert decoder.feed(prefixed(gzip.compress(b"hello"), 1) + prefixed(b"plain")) == [b"hello", b"plain"]
    with pytest.raises(WireError) as bomb:
        decoder.feed(prefixed(gzip.compress(bytes(100_000)), 1))
    assert bomb.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(WireError, match="no grpc-encoding"):
        MessageDecoder(1000).feed(prefixed(b"x", 1))
    deflate = grpc_wire.inflater(b"deflate", 1000)
    assert deflate(zlib.compress(b"zlib")) == b"zlib"
    assert deflate(zlib.compressobj(wbits=-15).compress(b"raw") + zlib.compressobj(wbits=-15).flush()) in (b"raw", b"")
    with pytest.raises(WireError) as unknown:
        grpc_wire.inflater(b"br", 1000)
    assert unknown.value.code is grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "value, seconds",
    [(b"2H", 7200.0), (b"3M", 180.0), (b"5S", 5.0), (b"100m", 0.1), (b"250u", 250e-6), (b"99999999n", 0.099999999)],
)
def test_timeout_units(value, seconds):
    assert grpc_wire.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"10", b"123456789S", b"1.5S", b"-1S", b"10s"])
def test_malformed_timeouts_are_refused(value):
    with pytest.raises(WireError):
        grpc_wire.parse_timeout(value)


@pytest.mark.parametrize("message", ["plain ascii", "100% sure", "ø — ünïcode", "line\nbreak", ""])
def test_grpc_message_percent_encoding_round_trips(message):
    encoded = grpc_wire.percent_encode(message)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert grpc_wire.percent_decode(encoded) == message


def test_grpc_content_types():
    for good in (b"application/grpc", b"application/grpc+proto", b"application/grpc;charset=utf-8"):
        assert grpc_wire.is_grpc_content_type(good)
    for bad in (None, b"application/json", b"application/grpc-web", b"application/grpcx", b"text/plain"):
        assert not grpc_wire.is_grpc_content_type(bad)


def run_on(loop_kind: str, coroutine_function):
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coroutine_function())
    return asyncio.run(coroutine_function())


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_watch_cancels_at_the_deadline_and_never_after_discard(loop_kind):
    async def scenario():
        watch = CallWatch(tick_s=0.005, poll_s=None)
        sleeper = asyncio.ensure_future(asyncio.sleep(10))
        finished = asyncio.ensure_future(asyncio.sleep(10))
        started = time.monotonic()
        late = watch.add(sleeper, started + 0.05)
        early = watch.add(finished, started + 0.02)
        watch.discard(early)  # ended before its deadline: must not be cancelled
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        waited = time.monotonic() - started
        watch.discard(late)
        assert late.ended_by == DEADLINE and early.ended_by is None and not finished.cancelled()
        assert 0.05 <= waited < 1.0, waited  # late only by a tick, plus a busy machine's delays
        assert "deadlines=0" in repr(watch) and "expired=1" in repr(watch)
        finished.cancel()

    run_on(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_watch_polls_long_calls_and_cancels_when_the_client_is_gone(loop_kind):
    async def scenario():
        watch = CallWatch(tick_s=0.005, poll_s=0.05)
        asked = []

        async def receive():
            asked.append(time.monotonic())
            return {"type": "http.disconnect"} if len(asked) >= 3 else {"type": "http.request", "body": b""}

        quick_asked = []

        async def quick_receive():
            quick_asked.append(time.monotonic())
            return {"type": "http.request", "body": b""}

        call = asyncio.ensure_future(asyncio.sleep(10))
        quick = asyncio.ensure_future(asyncio.sleep(0))
        watched = watch.add(call, None, receive)
        quick_watched = watch.add(quick, None, quick_receive)
        await quick
        watch.discard(quick_watched)
        with pytest.raises(asyncio.CancelledError):
            await call
        watch.discard(watched)
        assert watched.ended_by == DISCONNECT and len(asked) == 3
        assert quick_asked == []  # a call shorter than poll_s is never polled
        assert watch.disconnected == 1 and watch.wakes <= 10, watch

    run_on(loop_kind, scenario)


# ---------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
async def engine(tmp_path_factory):
    """One Envoy for the module, serving the test Methods; its stderr is checked at the end."""
    folder = tmp_path_factory.mktemp("envoy-engine")
    lifespan_log, stderr_path = folder / "lifespan.log", folder / "envoy.stderr"
    with open(stderr_path, "wb") as stderr:
        engine = EnvoyEngine(
            "127.0.0.1:0", METHODS, argument=str(lifespan_log), max_receive_bytes=LIMIT,
            app_options={"poll_s": 0.1}, options=EnvoyOptions(envoy_threads=2), stderr=stderr,
        )  # fmt: skip
        await engine.start()
        engine.lifespan_log = lifespan_log
        yield engine
        await engine.stop(0)
    assert lifespan_log.read_text().splitlines()[-1] == f"stopped {engine_pid(lifespan_log)}"
    logged = stderr_path.read_text(errors="replace")
    unexpected = [line for line in logged.splitlines() if any(sign in line for sign in (
        "Exception in ASGI application", "Exception in callback", "never retrieved", "Error in lifespan"))]  # fmt: skip
    # Each FailBug call logs "... failed unexpectedly" with its traceback; no other traceback may appear.
    assert logged.count("Traceback (most recent call last)") == logged.count("failed unexpectedly"), logged[-3000:]
    assert not unexpected, f"Envoy's Python logged unexpected errors: {unexpected}"


def engine_pid(lifespan_log) -> int:
    return int(lifespan_log.read_text().splitlines()[0].split()[1])


@pytest.fixture(scope="module")
def target(engine) -> str:
    return f"127.0.0.1:{engine.port}"


@pytest.fixture(scope="module")
def channel(target):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield channel


def h2_post(target: str, name: str, body: bytes, **headers: str):
    """A raw HTTP/2 POST (prior knowledge): the response's status, headers, body and trailers."""
    client = SyncClient(SyncHTTPTransport(http_version=HTTPVersion.HTTP2))
    sent = {"content-type": "application/grpc", "te": "trailers", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return client.post(f"http://{target}{path(name)}", headers=sent, content=body)


def test_services_are_built_inside_envoy_on_its_loop(engine):
    assert engine.lifespan_log.read_text().splitlines() == [f"started {engine.pid}"]


def test_unary_echo_sync(channel):
    echo = channel.unary_unary(path("Echo"))
    assert echo(b"hello", timeout=5) == b"hello"
    assert echo(b"", timeout=5) == b""
    big = random.Random(1).randbytes(LIMIT - 10)  # spans many HTTP/2 DATA frames
    assert echo(big, timeout=10) == big


async def test_unary_echo_aio(target):
    async with grpc.aio.insecure_channel(target) as channel:
        assert await channel.unary_unary(path("Echo"))(b"aio", timeout=5) == b"aio"


def test_bidi_stream_interleaves_one_reply_per_message_before_the_next_write(channel):
    replies: queue.Queue = queue.Queue()
    written = []

    def requests():
        for i in range(5):
            written.append(i)
            yield b"m%d" % i
            assert replies.get(timeout=5) == b"m%d" % i  # the reply came before the next write

    for reply in channel.stream_stream(path("EchoStream"))(requests(), timeout=20):
        assert reply == b"m%d" % (len(written) - 1)
        replies.put(reply)
    assert written == [0, 1, 2, 3, 4]


async def test_bidi_stream_aio_write_read_and_large_messages(target):
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(path("EchoStream"))(timeout=20)
        for size in (0, 3, 600_000, 900_000, 7):
            message = random.Random(size).randbytes(size)
            await call.write(message)
            assert await call.read() == message
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK


def test_deadline_exceeded_and_the_handler_cancelled_at_it(channel):
    sleep, cancellations = channel.unary_unary(path("Sleep")), channel.unary_unary(path("Cancellations"))
    before = len(json.loads(cancellations(b"", timeout=5)))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        sleep(b"5", timeout=0.3)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    # the server cancels the handler at the deadline (within a tick)
    cancelled = wait_until(lambda: json.loads(cancellations(b"", timeout=5)), "the handler to be cancelled", 2,
                           step=0.02, accept=lambda cancelled: len(cancelled) > before)
    assert cancelled[before].startswith("sleep") and "deadline None" not in cancelled[before]


def test_the_server_ends_a_late_call_with_deadline_exceeded(target):
    """The client sets grpc-timeout but keeps waiting: the status comes from the server, trailers-only."""
    started = time.monotonic()
    answer = h2_post(target, "Sleep", prefixed(b"5"), grpc_timeout="200m")
    assert 0.19 < time.monotonic() - started < 2.0
    assert answer.status == 200 and answer.content == b""
    assert answer.headers["grpc-status"] == "4" and answer.headers["grpc-message"] == "deadline exceeded"


def test_a_stream_past_its_deadline_ends_deadline_exceeded_after_its_replies(target):
    """The server's own DEADLINE_EXCEEDED, in trailers after a reply, while the client still writes."""

    def slow_requests():
        yield prefixed(b"first")
        time.sleep(1.0)
        yield prefixed(b"too late")

    started = time.monotonic()
    answer = h2_post(target, "EchoStream", slow_requests(), grpc_timeout="300m")
    assert 0.29 < time.monotonic() - started < 2.0
    assert answer.status == 200 and answer.content == prefixed(b"first")
    assert answer.trailers["grpc-status"] == "4" and answer.trailers["grpc-message"] == "deadline exceeded"


def test_a_deadline_is_passed_to_the_handler(channel):
    seen = json.loads(channel.unary_unary(path("Describe"))(b"", timeout=3))
    assert 2.0 < seen["remaining"] <= 3.1  # grpc rounds the timeout it sends up a little
    assert json.loads(channel.unary_unary(path("Describe"))(b""))["remaining"] is None


def test_custom_metadata_in_and_status_trailers_out(channel):
    metadata = (("x-tenant", "blue"), ("x-trace-bin", b"\x00\x01\xfe\xff"), ("x-tenant", "green"))
    reply, call = channel.unary_unary(path("Describe")).with_call(b"", timeout=5, metadata=metadata)
    seen = json.loads(reply)
    pairs = [[key, value] for key, value in seen["metadata"] if key.startswith("x-")]
    assert pairs == [["x-tenant", "blue"], ["x-trace-bin", base64.b64encode(b"\x00\x01\xfe\xff").decode()],
                     ["x-tenant", "green"]]  # fmt: skip
    assert any(key == "user-agent" for key, _ in seen["metadata"])
    assert not any(key in ("content-type", "te", "grpc-timeout") for key, _ in seen["metadata"])
    assert seen["peer"].startswith("ipv4:127.0.0.1:")
    assert call.code() is grpc.StatusCode.OK
    assert call.trailing_metadata() == ()  # grpc-status 0 travelled in trailers, and nothing else


def test_gateway_error_becomes_its_status_and_message(channel):
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary(path("FailStatus"))(b"", timeout=5)
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == STATUS_MESSAGE  # non-ASCII and '%' survive percent-encoding


def test_an_unexpected_exception_is_internal_and_the_server_keeps_serving(channel):
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(path("FailBug"))(b"", timeout=5)
        assert failed.value.code() is grpc.StatusCode.INTERNAL
        assert failed.value.details() == "internal gateway error (ValueError); the gateway's log has the details"
        assert channel.unary_unary(path("Echo"))(b"still here", timeout=5) == b"still here"


def test_errors_before_any_reply_are_trailers_only(target):
    for name, code in (("FailStatus", "5"), ("NoSuchMethod", "12"), ("FailStreamAtOnce", "13")):
        answer = h2_post(target, name, prefixed(b""))
        assert answer.status == 200, name
        assert answer.headers["grpc-status"] == code, name
        assert answer.content == b"" and len(answer.trailers) == 0, name  # the status came in the only HEADERS
    ok = h2_post(target, "Echo", prefixed(b"x"))
    assert "grpc-status" not in ok.headers and ok.trailers["grpc-status"] == "0"
    assert ok.content == prefixed(b"x")


def test_stream_errors_after_replies_come_in_trailers(channel):
    replies = []
    with pytest.raises(grpc.RpcError) as failed:
        for reply in channel.stream_stream(path("StreamThenFail"))(iter([b"a", b"b", b"fail", b"never"]), timeout=5):
            replies.append(reply)
    assert replies == [b"a", b"b", b"fail"]
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND and failed.value.details() == STATUS_MESSAGE


def test_unknown_method_is_unimplemented(channel):
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/no.Such/Method")(b"", timeout=5)
    assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "/no.Such/Method" in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:
        list(channel.stream_stream("/no.Such/Stream")(iter([b"x"]), timeout=5))
    assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_foreign_content_type_gets_http_415(target):
    answer = h2_post(target, "Echo", b"{}", content_type="application/json")
    assert answer.status == 415
    assert b"application/grpc" in answer.content


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
def test_compressed_requests(channel, compression):
    message = b"compress me " * 10_000
    assert channel.unary_unary(path("Echo"))(message, timeout=5, compression=compression) == message
    streamed = list(channel.stream_stream(path("EchoStream"))(iter([message, b"two"]), timeout=5, compression=compression))
    assert streamed == [message, b"two"]


def test_oversize_messages_are_refused_with_resource_exhausted(channel):
    for name, call in (("Echo", lambda m: channel.unary_unary(path("Echo"))(m, timeout=10)),
                       ("EchoStream", lambda m: list(channel.stream_stream(path("EchoStream"))(iter([m]), timeout=10)))):
        with pytest.raises(grpc.RpcError) as refused:
            call(b"x" * (LIMIT + 1))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, name
        assert f"{LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes" in refused.value.details(), name
    with pytest.raises(grpc.RpcError) as bomb:  # small on the wire, over the limit once inflated
        channel.unary_unary(path("Echo"))(bytes(4 * LIMIT), timeout=10, compression=grpc.Compression.Gzip)
    assert bomb.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert channel.unary_unary(path("Echo"))(b"fine", timeout=5) == b"fine"


async def test_2000_concurrent_unary_calls_on_one_channel_all_ok(target):
    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary(path("Echo"))
        started = time.monotonic()
        replies = await asyncio.gather(*(echo(b"%d" % i, timeout=60) for i in range(2000)), return_exceptions=True)
        elapsed = time.monotonic() - started
    failures = [reply for reply in replies if isinstance(reply, BaseException)]
    assert not failures, f"{len(failures)} of 2000 failed, e.g. {failures[0]!r}"
    assert replies == [b"%d" % i for i in range(2000)]
    print(f"2000 concurrent unary calls: {elapsed:.2f} s")


async def _sleeps_started(channel) -> int:
    return int(await channel.unary_unary(path("SleepsStarted"))(b"", timeout=5))


async def _sleep_started(channel, before: int) -> None:
    """Wait until a Sleep call has reached its handler (the engine's process counted more than `before`)."""
    for _ in range(500):
        if await _sleeps_started(channel) > before:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the Sleep call never reached its handler")


async def test_a_client_that_cancels_gets_its_handler_cancelled(target):
    """Unary: the watch polls long calls' clients; streaming: the request iterator sees the reset."""
    async with grpc.aio.insecure_channel(target) as channel:
        cancellations = channel.unary_unary(path("Cancellations"))
        before = len(json.loads(await cancellations(b"", timeout=5)))
        sleeps = await _sleeps_started(channel)
        call = channel.unary_unary(path("Sleep"))(b"30")  # no deadline: only the client's cancel ends it
        await _sleep_started(channel, sleeps)
        call.cancel()
        stream = channel.stream_stream(path("WaitStream"))()
        await stream.write(b"one")
        assert await stream.read() == b"one"
        stream.cancel()
        for _ in range(100):
            cancelled = json.loads(await cancellations(b"", timeout=5))
            if len(cancelled) >= before + 2:
                break
            await asyncio.sleep(0.02)
    new = sorted(entry.split()[0] for entry in cancelled[before:])
    assert new == ["sleep", "wait_stream"], cancelled[before:]
    assert "deadline None" in next(entry for entry in cancelled[before:] if entry.startswith("sleep"))


def test_tritonclient_grpc_infer_and_stream(target):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    values = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(values)
    with grpcclient.InferenceServerClient(target) as client:
        result = client.infer("simple", inputs, request_id="r1", client_timeout=5)
        assert np.array_equal(result.as_numpy("INPUT0"), values)
        assert result.get_response().id == "r1" and result.get_response().model_name == "simple"
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(3):
            client.async_stream_infer("simple", inputs, request_id=f"s{i}")
            result, error = answers.get(timeout=5)  # one answer per request, before the next is sent
            assert error is None and result.get_response().id == f"s{i}"
            assert np.array_equal(result.as_numpy("INPUT0"), values)
        client.stop_stream()


async def test_tritonclient_grpc_aio_infer(target):
    aioclient = pytest.importorskip("tritonclient.grpc.aio")
    values = np.ones((2, 16), dtype=np.float32)
    inputs = [aioclient.InferInput("INPUT0", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(values)
    client = aioclient.InferenceServerClient(target)
    try:
        result = await client.infer("simple", inputs, client_timeout=5)
    finally:
        await client.close()
    assert np.array_equal(result.as_numpy("INPUT0"), values)


# ------------------------------------------------------------------- engines of their own


async def test_stop_drains_calls_in_flight_then_shuts_the_services(tmp_path):
    lifespan_log = tmp_path / "lifespan.log"
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(lifespan_log), options=EnvoyOptions(drain_s=1))
    await engine.start()
    assert isinstance(engine._server._process, ChildProcess)  # started by CPython's subprocess, not uvloop's
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        slow = asyncio.ensure_future(channel.unary_unary(path("Sleep"))(b"1.0", timeout=10))
        await _sleep_started(channel, 0)
        started = time.monotonic()
        await engine.stop(grace_s=5)
        stopped_after = time.monotonic() - started
        assert await slow == b"slept"  # the call in flight finished
    assert 0.5 < stopped_after < 4, stopped_after  # stop waited for it, not for the whole grace
    assert lifespan_log.read_text().splitlines() == [f"started {engine_pid(lifespan_log)}",
                                                     f"stopped {engine_pid(lifespan_log)}"]  # fmt: skip


async def test_a_factory_that_fails_fails_the_start(tmp_path):
    from pyvoy import StartupError

    engine = EnvoyEngine("127.0.0.1:0", "tests.envoy_engine_methods:build_failing", argument="nowhere")
    with pytest.raises(StartupError):
        await engine.start()
    assert engine.pid is None


async def test_on_the_stock_asyncio_loop(tmp_path):
    """The same engine on asyncio's own loop instead of uvloop (pyvoy's --loop asyncio)."""
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "lifespan.log"),
                         options=EnvoyOptions(loop="asyncio"))  # fmt: skip
    async with engine:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            assert await channel.unary_unary(path("Echo"))(b"on asyncio", timeout=5) == b"on asyncio"
            call = channel.stream_stream(path("EchoStream"))(timeout=5)
            for message in (b"a", b"b"):
                await call.write(message)
                assert await call.read() == message
            await call.done_writing()
            assert await call.code() is grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await channel.unary_unary(path("Sleep"))(b"5", timeout=0.2)
            assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_an_engine_leaves_nothing_in_dev_shm(tmp_path):
    """Envoy's hot restart (off: the gateway never hands its sockets to a new Envoy) would leave a
    /dev/shm/envoy_shared_memory_* file behind every Envoy that ran: one per gateway start."""
    shm = Path("/dev/shm")
    before = set(shm.glob("envoy_shared_memory_*"))
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "lifespan.log"))
    async with engine:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            assert await channel.unary_unary(path("Echo"))(b"x", timeout=5) == b"x"
        assert set(shm.glob("envoy_shared_memory_*")) == before
    assert set(shm.glob("envoy_shared_memory_*")) == before


# A launcher in a process of its own: it starts an engine, says where, and waits to be killed.
_LAUNCHER = """
import asyncio, sys
from gateway.server.engines.envoy_server import EnvoyEngine

async def main():
    engine = EnvoyEngine("127.0.0.1:0", sys.argv[1], argument=sys.argv[2])
    await engine.start()
    print(engine.pid, engine.port, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_an_envoy_dies_with_its_launcher_killed_outright(tmp_path):
    """A gateway killed with SIGKILL runs no stop(): its Envoy must end anyway, not serve the port on
    unsupervised (nor keep holding the output its own parent reads)."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, METHODS, str(tmp_path / "lifespan.log")],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    envoy_pid = None
    try:
        envoy_pid, port = map(int, launcher.stdout.readline().split())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(path("Echo"))(b"x", timeout=10) == b"x"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        wait_until(lambda: not process_running(envoy_pid), f"Envoy (pid {envoy_pid}) to end with its launcher", 20)
    finally:
        launcher.kill()
        launcher.wait()
        if envoy_pid is not None and process_running(envoy_pid):  # the test failed: leave no Envoy behind
            os.kill(envoy_pid, signal.SIGKILL)


async def test_two_engines_share_a_port_with_reuse_port(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = EnvoyOptions(reuse_port=True, envoy_threads=1)
    first = EnvoyEngine(f"127.0.0.1:{port}", METHODS, argument=str(tmp_path / "a.log"), options=options)
    second = EnvoyEngine(f"127.0.0.1:{port}", METHODS, argument=str(tmp_path / "b.log"), options=options)
    async with first, second:
        assert first.port == second.port == port and first.pid != second.pid
        pids = set()
        for _ in range(20):  # new connections are spread over both processes by the kernel
            # A subchannel pool of the channel's own: grpc shares connections between channels to
            # one target by default, and a new channel could ride the last one's connection.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                pids.add(json.loads(await channel.unary_unary(path("Describe"))(b"", timeout=5))["pid"])
        assert pids == {first.pid, second.pid}


def make_certificates(folder) -> dict[str, bytes]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made by openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tensorgate test CA")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ("-extfile", "server.ext")), ("client", ())):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", *extra)  # fmt: skip
    return {name: (folder / name).read_bytes() for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}  # fmt: skip


async def test_tls_and_mutual_tls(tmp_path):
    pem = make_certificates(tmp_path)
    tls = EnvoyOptions(tls_cert=pem["server.pem"], tls_key=pem["server.key"])
    mutual = EnvoyOptions(tls_cert=pem["server.pem"], tls_key=pem["server.key"], tls_client_ca=pem["ca.pem"])
    server_only = grpc.ssl_channel_credentials(root_certificates=pem["ca.pem"])
    with_client = grpc.ssl_channel_credentials(pem["ca.pem"], pem["client.key"], pem["client.pem"])
    async with EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "a.log"), options=tls) as engine:
        async with grpc.aio.secure_channel(f"localhost:{engine.port}", server_only) as channel:
            assert await channel.unary_unary(path("Echo"))(b"over tls", timeout=5) == b"over tls"
    async with EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "b.log"), options=mutual) as engine:
        async with grpc.aio.secure_channel(f"localhost:{engine.port}", with_client) as channel:
            assert await channel.unary_unary(path("Echo"))(b"mutual", timeout=5) == b"mutual"
        async with grpc.aio.secure_channel(f"localhost:{engine.port}", server_only) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(path("Echo"))(b"no client certificate", timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_http2_settings_reach_envoy_and_clients_queue_past_max_concurrent_streams(tmp_path):
    options = EnvoyOptions(max_concurrent_streams=8, initial_stream_window_bytes=65536,
                           initial_connection_window_bytes=1 << 20, connection_buffer_bytes=1 << 20)  # fmt: skip
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "a.log"), options=options)
    manager = engine.envoy_config()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["http2_protocol_options"] == {"max_concurrent_streams": 8, "initial_stream_window_size": 65536,
                                                 "initial_connection_window_size": 1 << 20}  # fmt: skip
    async with engine:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            echo = channel.unary_unary(path("Echo"))
            big = bytes(300_000)  # several stream windows' worth
            replies = await asyncio.gather(*(echo(b"%d" % i, timeout=30) for i in range(200)), echo(big, timeout=30))
    assert replies[:200] == [b"%d" % i for i in range(200)] and replies[200] == big


@pytest.mark.parametrize("codec", ["nghttp2", "oghttp2"])
async def test_the_http2_codec_chosen_is_the_one_envoy_runs(tmp_path, codec):
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "a.log"), options=EnvoyOptions(http2_codec=codec))
    async with engine:
        runtime = json.loads(await asyncio.to_thread(engine._admin, "GET", "/runtime"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            echo = channel.unary_unary(path("Echo"))
            replies = await asyncio.gather(*(echo(b"%d" % i, timeout=30) for i in range(50)))
    flag = runtime["entries"]["envoy.reloadable_features.http2_use_oghttp2"]
    assert flag["final_value"] == ("true" if codec == "oghttp2" else "false"), flag
    assert replies == [b"%d" % i for i in range(50)]


def test_an_unknown_http2_codec_is_refused():
    with pytest.raises(ValueError, match="http2_codec: expected one of nghttp2, oghttp2, got 'h2o'"):
        EnvoyEngine("127.0.0.1:0", METHODS, options=EnvoyOptions(http2_codec="h2o")).envoy_config()


def test_a_config_naming_an_unknown_http2_codec_is_refused():
    from gateway.config import config_from_mapping
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="server.http2_codec.*expected one of nghttp2, oghttp2, got 'h2o'"):
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}},
                             "server": {"http2_codec": "h2o"}})


@pytest.mark.parametrize("stats", ["needed", "all"])
async def test_envoy_keeps_only_the_stats_the_engine_reads_unless_told_all(tmp_path, stats):
    engine = EnvoyEngine("127.0.0.1:0", METHODS, argument=str(tmp_path / "a.log"), options=EnvoyOptions(stats=stats))
    async with engine:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            assert await channel.unary_unary(path("Echo"))(b"x", timeout=10) == b"x"
        names = {line.split(":")[0] for line in (await asyncio.to_thread(engine._admin, "GET", "/stats")).splitlines()}
        assert await asyncio.to_thread(engine.active_requests) == 0  # what the drain reads, kept either way
    assert "http.ingress_http.downstream_rq_active" in names
    assert ("http.ingress_http.downstream_rq_total" in names) is (stats == "all")
    if stats == "needed":
        kept = ("downstream_rq_active", "downstream_rq_too_many_premature_resets")
        assert all(name.endswith(kept) for name in names), sorted(names)[:20]


def test_an_unknown_stats_choice_is_refused():
    from gateway.config import config_from_mapping
    from gateway.errors import ConfigError

    with pytest.raises(ValueError, match="stats: expected one of needed, all, got 'some'"):
        EnvoyEngine("127.0.0.1:0", METHODS, options=EnvoyOptions(stats="some")).envoy_config()
    with pytest.raises(ConfigError, match="server.envoy_stats.*expected one of needed, all, got 'some'"):
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}},
                             "server": {"envoy_stats": "some"}})
