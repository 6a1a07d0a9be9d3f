"""A stand-in for Triton that answers at once and does no work: isolates a client's own cost.

    python -m gateway.bench.standin --grpc-port 0 --http-port 0      # prints both addresses

gRPC (grpc.aio, raw bytes): ModelInfer and ModelStreamInfer, each answered with a
ModelInferResponse whose OUTPUT0 is the request's first input (its id echoed, as Triton does;
stream answers carry `triton_final_response`, as Triton's do). HTTP/1.1 (an asyncio Protocol with
httptools, keep-alive): POST …/infer with the binary tensor extension, answered the same way with
the binary extension; GET /v2/health/ready answers 200.

Its own CPU is not what a benchmark measures; it only has to be cheap and the same for every
client it is compared across.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import grpc
import httptools

from gateway.protocol import INFERENCE_SERVICE, pb


def _answer(request) -> "pb.ModelInferResponse":
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version or "1",
                                     id=request.id)
    if request.inputs:
        first = request.inputs[0]
        response.outputs.add(name="OUTPUT0", datatype=first.datatype, shape=list(first.shape))
        if request.raw_input_contents:
            response.raw_output_contents.append(request.raw_input_contents[0])
    return response


async def _model_infer(raw: bytes, context) -> bytes:
    return _answer(pb.ModelInferRequest.FromString(raw)).SerializeToString()


async def _model_stream_infer(requests, context):
    async for raw in requests:
        response = _answer(pb.ModelInferRequest.FromString(raw))
        response.parameters["triton_final_response"].bool_param = True
        yield pb.ModelStreamInferResponse(infer_response=response).SerializeToString()


class _HttpServer(asyncio.Protocol):
    """One HTTP connection: any number of requests, one after the other."""

    def __init__(self) -> None:
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.header_length = -1
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = int(value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body, header_length = self.url, b"".join(self.body), self.header_length
        self.url, self.body, self.header_length = b"", [], -1
        if not url.endswith(b"/infer"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        parts = url.decode().strip("/").split("/")  # v2 models <m> [versions <v>] infer
        version = parts[4] if len(parts) > 5 and parts[3] == "versions" else "1"
        request = json.loads(body[:header_length] if header_length >= 0 else body)
        first = request["inputs"][0]
        size = first["parameters"]["binary_data_size"]
        start = max(header_length, 0)
        blob = body[start:start + size]
        answer = {"model_name": parts[2], "model_version": version,
                  "outputs": [{"name": "OUTPUT0", "datatype": first["datatype"], "shape": first["shape"],
                               "parameters": {"binary_data_size": len(blob)}}]}
        if "id" in request:
            answer["id"] = request["id"]
        header = json.dumps(answer, separators=(",", ":")).encode()
        self.transport.write(b"".join((
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: ",
            str(len(header)).encode(), b"\r\nContent-Length: ", str(len(header) + len(blob)).encode(),
            b"\r\n\r\n", header, blob,
        )))


async def serve(grpc_port: int, http_port: int, host: str = "127.0.0.1") -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(_model_infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_model_stream_infer),
    }),))
    bound_grpc = server.add_insecure_port(f"{host}:{grpc_port}")
    await server.start()
    loop = asyncio.get_running_loop()
    http = await loop.create_server(_HttpServer, host, http_port)
    bound_http = http.sockets[0].getsockname()[1]
    print(f"stand-in triton serving grpc {host}:{bound_grpc} http {host}:{bound_http}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.close()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.standin", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.grpc_port, args.http_port))


if __name__ == "__main__":
    main()
