"""Bare grpc.aio echo server: the cost floor of any Python gRPC server on uvloop, for comparison.

It serves `/inference.GRPCInferenceService/ModelInfer` with no serializers and no work: every
request, whatever it holds, gets the same prebuilt serialized ModelInferResponse (one [1, 16] FP32
OUTPUT0 by default). Its CPU per request is the baseline the gateway's own is measured against.

    python -m gateway.bench.echo --port 9100     # prints "echo serving on 127.0.0.1:9100"
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
import numpy as np

from gateway.protocol import INFERENCE_SERVICE

__all__ = ["build_infer_response", "start_echo_server"]


def build_infer_response(model: str = "simple_scale", *, rows: int = 1, cols: int = 16) -> bytes:
    """A serialized ModelInferResponse like Triton's for `simple_scale` with a [rows, cols] FP32 input."""
    from gateway.protocol import pb

    values = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) * 2
    response = pb.ModelInferResponse(model_name=model, model_version="1")
    tensor = response.outputs.add()
    tensor.name = "OUTPUT0"
    tensor.datatype = "FP32"
    tensor.shape.extend(values.shape)
    response.raw_output_contents.append(values.tobytes())
    return response.SerializeToString()


async def start_echo_server(address: str = "127.0.0.1:0", response: bytes | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the echo server on `address`; returns the server and the port it bound."""
    answer = build_infer_response() if response is None else response

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        INFERENCE_SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port


async def _serve(host: str, port: int, rows: int, cols: int) -> None:
    server, bound = await start_echo_server(f"{host}:{port}", build_infer_response(rows=rows, cols=cols))
    print(f"echo serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free one)")
    parser.add_argument("--rows", type=int, default=1, help="rows of the fixed response's OUTPUT0")
    parser.add_argument("--cols", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(args.host, args.port, args.rows, args.cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
