"""The Method table tests/test_envoy_engine.py serves through the envoy engine.

`build(path)` is the services factory: the engine calls it inside Envoy's interpreter, on pyvoy's
event loop, at lifespan startup, and closes it at shutdown. It appends "started <pid>" and
"stopped <pid>" to the file at `path`, so a test can see both happen in the Envoy process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time

from gateway.errors import GatewayError, NotFound
from gateway.protocol import pb
from gateway.server.rpc import Call, Method, methods_of

SERVICE = "tensorgate.test.Echo"
STATUS_MESSAGE = "no model 'ø' at 100% — try 'simple'"

_cancelled: list[str] = []  # handlers that saw their task cancelled, in order
_slept = 0  # sleep handlers started: a test waits for its call to reach the handler


async def echo(request: bytes, call: Call) -> bytes:
    return request


async def echo_stream(requests, call: Call):
    async for request in requests:
        yield request


async def stream_then_fail(requests, call: Call):
    async for request in requests:
        yield request
        if request == b"fail":
            raise NotFound(STATUS_MESSAGE)


async def fail_status(request: bytes, call: Call) -> bytes:
    raise NotFound(STATUS_MESSAGE)


async def fail_bug(request: bytes, call: Call) -> bytes:
    raise ValueError("boom")


async def fail_stream_at_once(requests, call: Call):
    raise GatewayError("refused before any reply")
    yield b""  # pragma: no cover - makes this an async generator


async def sleep(request: bytes, call: Call) -> bytes:
    """Sleeps `request` seconds (a decimal string); records a cancellation."""
    global _slept
    _slept += 1
    try:
        await asyncio.sleep(float(request or b"10"))
    except asyncio.CancelledError:
        _cancelled.append(f"sleep {time.monotonic():.3f} deadline {call.deadline}")
        raise
    return b"slept"


async def wait_stream(requests, call: Call):
    """Echoes a stream; records a cancellation (the client leaving while it waits for a request)."""
    try:
        async for request in requests:
            yield request
    except asyncio.CancelledError:
        _cancelled.append("wait_stream")
        raise


async def model_stream_infer(requests, call: Call):
    """ModelStreamInfer: each request's model_infer answer, wrapped in a ModelStreamInferResponse."""
    async for request in requests:
        answer = pb.ModelInferResponse.FromString(await model_infer(request, call))
        yield pb.ModelStreamInferResponse(infer_response=answer).SerializeToString()


async def cancellations(request: bytes, call: Call) -> bytes:
    return json.dumps(_cancelled).encode()


async def sleeps_started(request: bytes, call: Call) -> bytes:
    return b"%d" % _slept


async def describe(request: bytes, call: Call) -> bytes:
    """What the handler knows of its call, as JSON ("-bin" values base64 here, to fit JSON)."""
    metadata = [
        [key, base64.b64encode(value).decode() if isinstance(value, bytes) else value] for key, value in call.metadata
    ]
    remaining = None if call.deadline is None else call.deadline - time.monotonic()
    return json.dumps({"metadata": metadata, "peer": call.peer, "remaining": remaining, "pid": os.getpid()}).encode()


async def model_infer(request: bytes, call: Call) -> bytes:
    """ModelInfer that answers each input as an output of the same name, shape and contents."""
    infer = pb.ModelInferRequest.FromString(request)
    response = pb.ModelInferResponse(model_name=infer.model_name, model_version=infer.model_version or "1", id=infer.id)
    for tensor in infer.inputs:
        output = response.outputs.add()
        output.name = tensor.name
        output.datatype = tensor.datatype
        output.shape.extend(tensor.shape)
    response.raw_output_contents.extend(infer.raw_input_contents)
    return response.SerializeToString()


def methods() -> list[Method]:
    table = methods_of(
        SERVICE,
        {"Echo": echo, "FailStatus": fail_status, "FailBug": fail_bug, "Sleep": sleep,
         "Cancellations": cancellations, "SleepsStarted": sleeps_started, "Describe": describe},
        {"EchoStream": echo_stream, "StreamThenFail": stream_then_fail, "FailStreamAtOnce": fail_stream_at_once,
         "WaitStream": wait_stream},
    )  # fmt: skip
    table.append(Method("/inference.GRPCInferenceService/ModelInfer", False, model_infer))
    table.append(Method("/inference.GRPCInferenceService/ModelStreamInfer", True, model_stream_infer))
    return table


@contextlib.asynccontextmanager
async def build(path: str):
    asyncio.get_running_loop()  # built on the loop that serves
    with open(path, "a") as log:
        log.write(f"started {os.getpid()}\n")
    try:
        yield methods()
    finally:
        with open(path, "a") as log:
            log.write(f"stopped {os.getpid()}\n")


async def build_failing(path: str):
    raise RuntimeError(f"cannot build the services from {path}")
