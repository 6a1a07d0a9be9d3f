"""One load process of `tensorgate bench`: runs steps of load on order, reports measurement windows.

The harness (gateway/bench/harness.py) starts `--workers` of these (multiprocessing, spawn) and
talks to each over a pipe:

    harness → worker   ("step", Step)            start a step: load on one target, one level
    worker  → harness  ("window", Window)        every `window_s` while the step runs
    harness → worker   ("stop",)                 end the step (read at once, mid-window too)
    worker  → harness  ("done", StepTotals)      in-flight requests finished; the totals of the step
    harness → worker   None                      exit

Load, as gateway/bench/loadgen.py: prebuilt serialized requests sent as raw bytes (no serializers),
so the client's cost per request is the gRPC call and little else.

- closed loop (`mode="concurrency"`): `level` slots, each sends its next request when its last
  is answered; latency is send → answer.
- open loop (`mode="rate"`): arrivals at `level` requests/s, Poisson (exponential gaps from a seeded
  generator), each sent at its scheduled time whatever is still in flight. Latency is measured from
  the *scheduled* time, not from when the request actually left: if the client or the target falls
  behind, the wait shows in the latency instead of vanishing (coordinated omission). How late sends
  left (`lag`) is reported too, so a harness that cannot keep up is seen as such.
- `stream=True`: over ModelStreamInfer streams (one per closed-loop slot up to `streams`, shared
  by the slots beyond), requests told apart by their `id`.

A request belongs to the window in which it was answered. CPU is this process's own (all its
threads), read at the window's edges.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import time
import traceback
from dataclasses import dataclass, field

import grpc
import numpy as np

__all__ = ["Step", "StepTotals", "Window", "worker_main"]

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_MAX_SAMPLES = 5


@dataclass
class Step:
    target: str
    mode: str  # "concurrency" or "rate"
    level: float  # this worker's share: slots (concurrency) or requests/s (rate)
    window_s: float
    warmup_s: float
    timeout_s: float = 30.0
    stream: bool = False
    streams: int = 1
    check_every: int = 64
    seed: int = 0


@dataclass
class Window:
    requests: int
    latencies_ns: bytes  # int64, one per successful request answered in the window
    errors: dict[str, int]
    error_samples: list[str]
    seconds: float
    cpu_seconds: float
    sent: int
    lags_ns: bytes  # int64, open loop only: actual send time − scheduled time of each send
    checked: int


@dataclass
class StepTotals:
    sent: int
    answered: int
    """Replies the target gave without an error status (wrong ones too): what its own count shows."""
    failed: int


@dataclass
class _Recorder:
    """What the current window has seen; swapped out at each window's edge."""

    latencies: array.array = field(default_factory=lambda: array.array("q"))
    lags: array.array = field(default_factory=lambda: array.array("q"))
    errors: collections.Counter = field(default_factory=collections.Counter)
    samples: list = field(default_factory=list)
    sent: int = 0
    checked: int = 0
    measuring: bool = False

    def error(self, code: str, message: str) -> None:
        if not self.measuring:
            return
        self.errors[code] += 1
        text = f"{code}: {message}"
        if len(self.samples) < _MAX_SAMPLES and text not in self.samples:
            self.samples.append(text)


class _Load:
    """One step's load on one channel."""

    def __init__(self, channel: grpc.aio.Channel, payloads: list[bytes], checkers: list, step: Step) -> None:
        self.channel = channel
        self.payloads = payloads
        self.checkers = checkers
        self.step = step
        self.recorder = _Recorder()
        self.stopping = False
        self.sent_total = 0
        self.answered_total = 0
        self.failed_total = 0
        self.replies = 0
        self.unary = channel.unary_unary(INFER_METHOD)
        self.streams: list[_Stream] = []
        self.next_stream = 0

    # ---- one request ---------------------------------------------------------------------------

    async def send(self, index: int, start_ns: int, stream: "_Stream | None" = None) -> None:
        """Send payload `index` (over `stream`, or the next stream in turn, or unary); its latency
        counts from `start_ns` (the send time, or the scheduled time)."""
        recorder = self.recorder
        self.sent_total += 1
        recorder.sent += recorder.measuring
        payload = self.payloads[index]
        try:
            if self.streams:
                if stream is None:
                    self.next_stream = (self.next_stream + 1) % len(self.streams)  # round robin
                    stream = self.streams[self.next_stream]
                reply, error = await stream.infer(payload)
                if error is not None:  # the model's error, as a stream carries it (no status code)
                    self.failed_total += 1
                    self.recorder.error("STREAM_ERROR", error)
                    return
            else:
                reply = await self.unary(payload, timeout=self.step.timeout_s)
        except grpc.RpcError as error:
            self.failed_total += 1
            self.recorder.error(error.code().name, error.details() or "")
            if stream is not None:
                await asyncio.sleep(0.01)  # a broken stream: do not spin while it is being replaced
            return
        answered = time.perf_counter_ns()
        self.answered_total += 1
        recorder = self.recorder  # the window may have turned while the request was in flight
        if self._wrong(index, reply, recorder):
            return
        if recorder.measuring:
            recorder.latencies.append(answered - start_ns)

    def _wrong(self, index: int, reply, recorder: _Recorder) -> bool:
        """Check every `check_every`-th reply; True (and an error counted) if it is wrong."""
        check = self.step.check_every and self.replies % self.step.check_every == 0
        self.replies += 1
        if check and self.checkers:
            recorder.checked += recorder.measuring
            if not isinstance(reply, bytes):  # a stream's reply: the ModelInferResponse inside
                reply = reply.infer_response.SerializeToString()
            try:
                wrong = self.checkers[index](reply)
            except Exception as error:  # noqa: BLE001 - an unparsable reply is a wrong one
                wrong = f"wrong reply: cannot parse it ({error})"
            if wrong is not None:
                self.failed_total += 1
                recorder.error("WRONG_REPLY", wrong)
                return True
        return False

    # ---- closed loop ---------------------------------------------------------------------------

    async def slot(self, number: int) -> None:
        count = len(self.payloads)
        for turn in itertools.count(number):
            if self.stopping:
                return
            index = turn % count
            stream = self.streams[number % len(self.streams)] if self.streams else None
            await self.send(index, time.perf_counter_ns(), stream)

    # ---- open loop -----------------------------------------------------------------------------

    async def arrivals(self) -> None:
        """Poisson arrivals at `level`/s; each request runs as a task of its own."""
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng(self.step.seed)
        mean_gap_ns = 1e9 / self.step.level
        gaps = iter(())
        pending: set[asyncio.Task] = set()
        count = len(self.payloads)
        clock = time.perf_counter_ns
        next_ns = clock()
        for number in itertools.count():
            while True:
                now = clock()
                if next_ns > now:
                    break
                if self.recorder.measuring:
                    self.recorder.lags.append(now - next_ns)
                task = loop.create_task(self.send(number % count, next_ns))
                pending.add(task)
                task.add_done_callback(pending.discard)
                gap = next(gaps, None)
                if gap is None:
                    gaps = iter(rng.exponential(mean_gap_ns, 4096).astype(np.int64).tolist())
                    gap = next(gaps)
                next_ns += gap
                number += 1
            if self.stopping:
                break
            await asyncio.sleep((next_ns - clock()) / 1e9)
        if pending:
            await asyncio.wait(pending, timeout=self.step.timeout_s + 5)

    # ---- the step ------------------------------------------------------------------------------

    async def open_streams(self, count: int) -> None:
        self.streams = [_Stream(self.channel) for _ in range(count)]
        for stream in self.streams:
            stream.start()

    async def close_streams(self) -> None:
        for stream in self.streams:
            await stream.close()


class _Stream:
    """One ModelStreamInfer call; requests matched to responses by the `id` the stream sets."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.method = channel.stream_stream(STREAM_METHOD)
        self.call = None
        self.pending: dict[str, asyncio.Future] = {}
        self.ids = itertools.count()
        self.reader: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    def start(self) -> None:
        self.call = self.method()
        self.reader = asyncio.ensure_future(self._read(self.call))

    async def infer(self, payload: bytes) -> tuple[object, str | None]:
        """(the ModelStreamInferResponse, its error message or None)."""
        from gateway.protocol import pb

        request_id = str(next(self.ids))
        # Fields later in a message override earlier ones: appending `id` sets it without reserializing.
        tagged = payload + pb.ModelInferRequest(id=request_id).SerializeToString()
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        if self.call is None or self.call.done():
            self.start()
        try:
            async with self.lock:  # one write at a time on a grpc.aio stream
                await self.call.write(tagged)
        except (grpc.RpcError, asyncio.InvalidStateError) as error:
            self.pending.pop(request_id, None)
            if isinstance(error, grpc.RpcError):
                raise
            raise _StreamBroken() from error
        return await future

    async def _read(self, call) -> None:
        from gateway.protocol import pb

        try:
            async for reply in call:
                message = pb.ModelStreamInferResponse.FromString(reply)
                future = self.pending.pop(message.infer_response.id, None)
                if future is not None and not future.done():
                    future.set_result((message, message.error_message or None))
        except grpc.RpcError as error:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()

    async def close(self) -> None:
        if self.call is not None and not self.call.done():
            try:
                await self.call.done_writing()
            except Exception:  # noqa: BLE001 - closing a stream the target already broke
                pass
            self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()


class _StreamBroken(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the stream ended while a request was being written"


async def _run_step(step: Step, channel, payloads, checkers, commands: asyncio.Queue, conn) -> None:
    load = _Load(channel, payloads, checkers, step)
    if step.stream:
        slots = int(step.level) if step.mode == "concurrency" else step.streams
        await load.open_streams(max(1, min(slots, step.streams)))
    if step.mode == "concurrency":
        tasks = [asyncio.ensure_future(load.slot(number)) for number in range(int(step.level))]
    else:
        tasks = [asyncio.ensure_future(load.arrivals())]
    stop = asyncio.ensure_future(commands.get())
    try:
        done, _ = await asyncio.wait([stop, *tasks], timeout=step.warmup_s, return_when=asyncio.FIRST_COMPLETED)
        _raise_failed(tasks)
        while not stop.done():
            recorder = _Recorder(measuring=True)
            load.recorder = recorder
            cpu_before, start = time.process_time(), time.perf_counter()
            await asyncio.wait([stop, *tasks], timeout=step.window_s, return_when=asyncio.FIRST_COMPLETED)
            _raise_failed(tasks)
            if stop.done():
                recorder.measuring = False
                break
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_before
            recorder.measuring = False
            conn.send(("window", Window(
                requests=len(recorder.latencies), latencies_ns=recorder.latencies.tobytes(),
                errors=dict(recorder.errors), error_samples=recorder.samples, seconds=seconds, cpu_seconds=cpu,
                sent=recorder.sent, lags_ns=recorder.lags.tobytes(), checked=recorder.checked,
            )))
    finally:
        load.stopping = True
        load.recorder = _Recorder()
        if tasks:
            await asyncio.wait(tasks, timeout=step.timeout_s + 10)
        for task in tasks:
            task.cancel()
        await load.close_streams()
        if not stop.done():
            stop.cancel()
    conn.send(("done", StepTotals(sent=load.sent_total, answered=load.answered_total, failed=load.failed_total)))


def _raise_failed(tasks) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


async def _serve(conn, payloads: list[bytes], check_every: int) -> None:
    from gateway.bench.loadgen import reply_checker

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    checkers = [reply_checker(payload) for payload in payloads] if check_every else []
    channels: dict[str, grpc.aio.Channel] = {}
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]
    try:
        while True:
            message = await inbox.get()
            if message is None:
                return
            if message[0] != "step":
                continue  # a stop that arrived after its step ended
            step: Step = message[1]
            channel = channels.get(step.target)
            if channel is None:
                channel = channels[step.target] = grpc.aio.insecure_channel(step.target, options=options)
                await asyncio.wait_for(channel.channel_ready(), step.timeout_s)
            await _run_step(step, channel, payloads, checkers, inbox, conn)
    finally:
        loop.remove_reader(conn.fileno())
        for channel in channels.values():
            await channel.close()


def worker_main(conn, payloads: list[bytes], check_every: int) -> None:
    """The body of one load process (multiprocessing target)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    try:
        asyncio.run(_serve(conn, payloads, check_every))
    except BaseException:  # noqa: BLE001 - everything goes back to the harness, which says it
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise
