"""Unit tests of InferStream against an in-process stand-in of Triton's ModelStreamInfer.

The stand-in answers out of order, in pieces for decoupled requests, with Triton's stream-error
shape (`error_message` and the request id), and can break the stream: the multiplexing rules
(correlation by id, exactly-once resolution, a break fails every pending request UNAVAILABLE and
tells the backend) are checked here; test_conformance.py and test_stateful_and_decoupled.py check
the same stream against real Tritons.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.errors import BackendError, Unavailable
from gateway.protocol import pb
from gateway.protocol.tensors import FINAL_FLAG_REQUEST, FINAL_FLAG_RESPONSE
from gateway.upstream.stream import STREAM_METHOD, InferStream, StreamClosed


class StandInTriton:
    """ModelStreamInfer: model "reverse" answers each pending request when a third arrives, last
    first; "fail" answers with an error message; "pieces" sends two responses and a final flag;
    "break" aborts the stream."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.stream)},
        )])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.seen_flags: list[bool] = []

    async def stream(self, requests, context):
        held = []
        async for raw in requests:
            request = pb.ModelInferRequest.FromString(raw)
            flag = request.parameters.get(FINAL_FLAG_REQUEST)
            self.seen_flags.append(bool(flag and flag.bool_param))
            if request.model_name == "break":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            if request.model_name == "fail":
                failure = pb.ModelStreamInferResponse(error_message="in ensemble 'x': bad input")
                failure.infer_response.id = request.id
                yield failure.SerializeToString()
            elif request.model_name == "pieces":
                for index in range(2):
                    yield pb.ModelStreamInferResponse(
                        infer_response=pb.ModelInferResponse(id=request.id, model_version=str(index))).SerializeToString()
                final = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=request.id))
                final.infer_response.parameters[FINAL_FLAG_RESPONSE].bool_param = True
                yield final.SerializeToString()
            else:
                held.append(request)
                if len(held) == 3:
                    for waiting in reversed(held):
                        yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
                            id=waiting.id, model_name=waiting.model_name, model_version=waiting.model_version,
                        )).SerializeToString()
                    held.clear()


@pytest.fixture
async def stand_in():
    triton = StandInTriton()
    await triton.server.start()
    yield triton
    await triton.server.stop(0)


@pytest.fixture
async def stream(stand_in):
    broken: list[str] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stand_in.port}")
    infer_stream = InferStream(channel, "stand-in", broken.append)
    infer_stream.broken = broken
    yield infer_stream
    await infer_stream.close()
    await channel.close()


def infer_request(model: str, tag: str = "") -> object:
    return pb.ModelInferRequest(model_name=model, model_version=tag, id="client-id")


async def test_responses_are_matched_to_their_requests_out_of_order(stream):
    entries = [stream.submit(infer_request("reverse", tag)) for tag in ("a", "b", "c")]
    responses = await asyncio.wait_for(asyncio.gather(*(e.future for e in entries)), 5)
    assert [r.model_version for r in responses] == ["a", "b", "c"]
    assert stream.broken == []


async def test_a_stream_error_fails_only_its_request(stream):
    failing = stream.submit(infer_request("fail"))
    others = [stream.submit(infer_request("reverse", tag)) for tag in ("a", "b", "c")]
    with pytest.raises(BackendError, match="bad input"):
        await asyncio.wait_for(failing.future, 5)
    assert [r.model_version for r in await asyncio.gather(*(e.future for e in others))] == ["a", "b", "c"]


async def test_decoupled_requests_get_every_piece_and_ask_for_the_final_flag(stream, stand_in):
    entry = stream.submit(infer_request("pieces"), decoupled=True)
    pieces = [await asyncio.wait_for(entry.queue.get(), 5) for _ in range(3)]
    assert [p.model_version for p in pieces[:2]] == ["0", "1"]
    assert pieces[2].parameters[FINAL_FLAG_RESPONSE].bool_param
    assert stand_in.seen_flags == [True]


async def test_a_break_fails_every_pending_request_unavailable_and_reopens(stream):
    waiting = [stream.submit(infer_request("reverse", "a"))]  # held: the third never comes
    decoupled = stream.submit(infer_request("reverse", "b"), decoupled=True)
    stream.submit(infer_request("break"))
    for entry in waiting:
        with pytest.raises(Unavailable, match="unavailable .connection failed or lost.; retry") as error:
            await asyncio.wait_for(entry.future, 5)
        assert "stream broke" in error.value.detail  # for the log, not the client
    closed = await asyncio.wait_for(decoupled.queue.get(), 5)
    assert isinstance(closed, StreamClosed) and isinstance(closed.error, Unavailable)
    assert len(stream.broken) == 1
    again = [stream.submit(infer_request("reverse", tag)) for tag in ("x", "y", "z")]  # a fresh call
    assert [r.model_version for r in await asyncio.wait_for(asyncio.gather(*(e.future for e in again)), 5)] == ["x", "y", "z"]


async def test_a_closed_stream_refuses_new_requests(stream):
    await stream.close()
    with pytest.raises(Unavailable, match="unavailable") as error:
        stream.submit(infer_request("reverse"))
    assert "stream closed" in error.value.detail
    assert stream.broken == []  # closing is not a break


def test_stream_method_is_tritons():
    assert STREAM_METHOD == "/inference.GRPCInferenceService/ModelStreamInfer"
