"""What the Python of one request costs inside the envoy engine, measured in one process without Envoy.

    python benchmarks/bench_app_inprocess.py [--requests N] [--rounds R] [--json OUT]

In Envoy, a request's Python runs on pyvoy's event-loop thread, interleaved with pyvoy's hand-overs
between Envoy's threads; a profile of that process cannot tell the app's cost from the hand-overs'.
Here the same ASGI app (`GrpcAsgiApp`) runs on uvloop in this process, driven the way pyvoy drives
it — a task per request, `receive` a future already holding the whole gRPC message, `send` an
awaitable already complete, as pyvoy's is — with 64 requests in flight (1×16 FP32 `simple_scale`,
a 30 s `grpc-timeout`, what `gateway.bench.loadgen` sends), against a real Triton from the wheel.
Process CPU time (`time.process_time`) per request, three configurations in alternating rounds:

  driver   the load loop over a coroutine that yields once (subtracted: "net")
  engine   the app over a handler that returns a canned reply: the gRPC layer alone
  gateway  the app over the gateway's services (`app.envoy_services`: batching off, the default
           HTTP upstream to Triton): everything a pass-through request costs in Python, its
           upstream socket calls included

The gateway's own stages alone (no gRPC, no sockets) are `bench_hot_path.py`; the upstream client
alone is `bench_upstream.py`; Envoy's whole process under real load is `bench_gateway.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from gateway.app import envoy_services  # noqa: E402
from gateway.bench.loadgen import build_infer_request  # noqa: E402
from gateway.bench.measure import machine  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository  # noqa: E402
from gateway.protocol import pb  # noqa: E402
from gateway.server.engines.grpc_asgi import GrpcAsgiApp  # noqa: E402
from gateway.server.engines.grpc_wire import frame  # noqa: E402
from gateway.server.rpc import Method  # noqa: E402

MODEL = "simple_scale"
PATH = "/inference.GRPCInferenceService/ModelInfer"
CONCURRENCY = 64
HEADERS = ((b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"30S"),
           (b"user-agent", b"grpc-python/1.0"), (b"grpc-accept-encoding", b"identity,deflate,gzip"))


class _Complete:
    """What pyvoy's `send` returns: an awaitable that is already complete (no loop turn)."""

    def __await__(self):
        return
        yield  # pragma: no cover - makes this a generator


_COMPLETE = _Complete()


def _send(message: dict) -> _Complete:
    return _COMPLETE


async def _drive(handle, requests: int) -> float:
    """CPU µs per request of `handle()` run `requests` times, CONCURRENCY at once, a task each."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(CONCURRENCY)
    finished = asyncio.Event()
    left = [requests]

    def done(task: asyncio.Task) -> None:
        slots.release()
        left[0] -= 1
        if task.exception() is not None:
            raise task.exception()
        if not left[0]:
            finished.set()

    started = time.process_time()
    for _ in range(requests):
        await slots.acquire()
        loop.create_task(handle()).add_done_callback(done)
    await finished.wait()
    return (time.process_time() - started) / requests * 1e6


def _caller(app: GrpcAsgiApp, body: bytes):
    loop = asyncio.get_running_loop()
    message = {"type": "http.request", "body": body, "more_body": False}

    def receive() -> asyncio.Future:  # pyvoy's receive: a loop future, here already resolved
        future = loop.create_future()
        future.set_result(message)
        return future

    async def one() -> None:
        scope = {"type": "http", "http_version": "2", "method": "POST", "scheme": "http", "path": PATH,
                 "headers": list(HEADERS), "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8001),
                 "state": {}}
        await app(scope, receive, _send)

    return one


async def _yield_once() -> None:
    await asyncio.sleep(0)


async def _measure(triton_grpc: str, requests: int, rounds: int) -> dict[str, list[float]]:
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [triton_grpc]}},
              "batching": {"default": {"enabled": False}}}
    body = frame(build_infer_request(MODEL))
    reply = pb.ModelInferResponse(model_name=MODEL, model_version="1", id="").SerializeToString() + b"\x00" * 80

    async def canned(request, call):
        return reply

    engine = _caller(GrpcAsgiApp([Method(PATH, False, canned)]), body)
    services = envoy_services(json.dumps(config))
    gateway = _caller(GrpcAsgiApp(await services.__aenter__()), body)
    try:
        await _drive(gateway, 3000)  # warm: connections open, layouts and templates cached
        runs = {"driver": _yield_once, "engine": engine, "gateway": gateway}
        figures: dict[str, list[float]] = {name: [] for name in runs}
        for index in range(rounds):
            order = list(runs) if index % 2 == 0 else list(reversed(runs))
            for name in order:
                figures[name].append(await _drive(runs[name], requests))
        return figures
    finally:
        await services.__aexit__(None, None, None)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    print(machine("uvloop", "grpc"))
    triton = LocalTriton(default_model_repository(), name="bench-app-inprocess").start()
    try:
        figures = uvloop.run(_measure(triton.grpc_address, args.requests, args.rounds))
    finally:
        triton.stop()
    floor = statistics.median(figures["driver"])
    print(f"\nCPU µs per request, {args.requests} requests × {args.rounds} rounds, {CONCURRENCY} in flight: "
          "median [min–max]; net = minus the driver's median")
    for name in ("driver", "engine", "gateway"):
        net = "" if name == "driver" else f"   net {statistics.median(figures[name]) - floor:.1f}"
        print(f"  {name:8s} {_spread(figures[name])}{net}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
