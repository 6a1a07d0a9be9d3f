"""Multiplexes many inference requests over one long-lived ModelStreamInfer stream to a backend.

A unary gRPC call costs a Python gRPC client several times what one message on an open stream
costs (measured: ~147 µs against ~38 µs server-side; docs/architecture.md), so every backend keeps streams open and
requests ride them, correlated by an id the stream owns. The client's own request id is restored on
the way back by the caller.

Invariants:
- only the writer task calls `call.write` (grpc.aio refuses concurrent writes on one call);
- every pending entry is resolved exactly once: by its response, by the stream breaking
  (Unavailable, so the router may retry elsewhere), or dropped by its caller's cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

import grpc

from gateway.errors import BACKEND_UNAVAILABLE, BackendError, GatewayError, Unavailable
from gateway.protocol import pb
from gateway.protocol import triton_messages as triton
from gateway.protocol.tensors import FINAL_FLAG_REQUEST, FINAL_FLAG_RESPONSE

log = logging.getLogger(__name__)

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class _InFlight:
    """One request waiting on the stream: a future (single response) or a queue (decoupled)."""

    __slots__ = ("future", "queue", "client_id")

    def __init__(self, loop: asyncio.AbstractEventLoop, decoupled: bool, client_id: str) -> None:
        self.future = None if decoupled else loop.create_future()
        self.queue: asyncio.Queue | None = asyncio.Queue() if decoupled else None
        self.client_id = client_id  # the request's own id, which Triton's error messages quote


class StreamClosed:
    """Sentinel put on a decoupled request's queue when the stream broke under it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class InferStream:
    """One ModelStreamInfer call shared by many requests; opened lazily, reopened after a break."""

    def __init__(self, channel: grpc.aio.Channel, backend: str, on_broken: Callable[[str], None]) -> None:
        self._method = channel.stream_stream(STREAM_METHOD)
        self._backend = backend
        self._on_broken = on_broken
        self._pending: dict[str, _InFlight] = {}
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Task] = []
        self._next_id = 0
        self._closed = False

    def __repr__(self) -> str:
        state = "open" if self._call is not None else "idle"
        return f"<InferStream {self._backend} {state} pending={len(self._pending)} outbox={len(self._outbox)}>"

    @property
    def submitted(self) -> int:
        """Requests submitted to this stream since the gateway started (each takes the next stream id)."""
        return self._next_id

    def _ensure_open(self) -> None:
        if self._call is not None:
            return
        if self._closed:
            raise Unavailable(BACKEND_UNAVAILABLE, detail=f"backend {self._backend}: stream closed")
        call = self._method()
        self._call = call
        self._tasks = [
            asyncio.ensure_future(self._write_loop(call)),
            asyncio.ensure_future(self._read_loop(call)),
        ]

    def submit(self, request, decoupled: bool = False) -> _InFlight:
        """Queue `request` (a ModelInferRequest; its id is overwritten) and return its pending entry."""
        self._ensure_open()
        self._next_id += 1
        stream_id = str(self._next_id)
        entry = _InFlight(asyncio.get_running_loop(), decoupled, request.id)
        request.id = stream_id
        if decoupled:
            request.parameters[FINAL_FLAG_REQUEST].bool_param = True
        self._pending[stream_id] = entry
        self._outbox.append(request.SerializeToString())
        self._outbox_ready.set()
        return entry

    def forget(self, stream_id: str) -> None:
        """Drop a pending entry whose caller went away (cancelled); a late response is ignored."""
        self._pending.pop(stream_id, None)

    async def _write_loop(self, call) -> None:
        outbox, ready = self._outbox, self._outbox_ready
        try:
            while True:
                while outbox:
                    await call.write(outbox.popleft())
                ready.clear()
                await ready.wait()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the read loop sees the same break and reports it
            log.debug("stream to %s: write failed: %r", self._backend, error)

    async def _read_loop(self, call) -> None:
        pending = self._pending
        parse = pb.ModelStreamInferResponse.FromString
        error: Exception = Unavailable(BACKEND_UNAVAILABLE, detail=f"backend {self._backend}: stream ended")
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                message = parse(raw)
                response = message.infer_response
                stream_id = response.id
                entry = pending.get(stream_id)
                if entry is None:
                    continue
                if message.error_message:
                    failure = stream_error(message.error_message, stream_id, entry.client_id, self._backend)
                    del pending[stream_id]
                    if entry.future is not None:
                        if not entry.future.done():
                            entry.future.set_exception(failure)
                    else:
                        entry.queue.put_nowait(StreamClosed(failure))
                    continue
                if entry.future is not None:
                    del pending[stream_id]
                    if not entry.future.done():
                        entry.future.set_result(response)
                else:
                    final = response.parameters.get(FINAL_FLAG_RESPONSE)
                    if final is not None and final.bool_param:
                        del pending[stream_id]
                    entry.queue.put_nowait(response)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as rpc_error:
            error = Unavailable(BACKEND_UNAVAILABLE, detail=f"backend {self._backend}: stream broke: "
                                                            f"{rpc_error.code().name} {rpc_error.details()}")
        except Exception as unexpected:  # never let a bad message kill the gateway
            log.exception("stream to %s: unexpected failure", self._backend)
            error = Unavailable(BACKEND_UNAVAILABLE, detail=f"backend {self._backend}: stream failed: {unexpected!r}")
        self._break(call, error)

    def abandon(self, error: Exception) -> int:
        """Fail every pending request with `error` (the backend was ejected) and close the call;
        the next submit opens a fresh one. Returns the requests failed."""
        call = self._call
        if call is None:
            return 0
        count = len(self._pending)
        self._break(call, error, report=False)
        return count

    def _break(self, call, error: Exception, report: bool = True) -> None:
        """Fail every pending request with `error` and let the next submit open a fresh call."""
        if self._call is call:
            self._call = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        self._outbox.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None:
                if not entry.future.done():
                    entry.future.set_exception(error)
            else:
                entry.queue.put_nowait(StreamClosed(error))
        call.cancel()
        if report and not self._closed:
            self._on_broken(error.for_log() if isinstance(error, GatewayError) else str(error))

    async def close(self) -> None:
        self._closed = True
        call = self._call
        if call is not None:
            self._break(call, Unavailable("the gateway is shutting down; retry the request",
                                          detail=f"backend {self._backend}: stream closed at shutdown"))


def stream_error(text: str, stream_id: str, client_id: str, backend: str) -> GatewayError:
    """The error a backend reported on the stream, with the status Triton would have answered.

    Triton's stream carries an error's message and no code; Triton's own wording says which code it
    is for the errors Triton defines (gateway/protocol/triton_messages.py), and anything else (a
    model's own message) stays INTERNAL. UNAVAILABLE becomes Unavailable, as on the unary path, so
    the request may be retried elsewhere. The message quotes the stream's request id, which is the
    gateway's; the client's own is put back.
    """
    text = text.replace(triton.request_prefix(stream_id), triton.request_prefix(client_id), 1)
    code = triton.status_of(text) or grpc.StatusCode.INTERNAL
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the backend is unavailable: {text}", detail=f"backend {backend}")
    return BackendError(code, text, backend)
