"""What the Python of one request costs inside the envoy engine, measured in one process without Envoy.

    python benchmarks/bench_app_inprocess.py [--requests N] [--rounds R] [--telemetry] [--json OUT]

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

With `--telemetry`, three more, as bench_gateway.py's telemetry section compares them (an OTLP
receiver runs as a process of its own, its CPU not counted):

  batching    the gateway with its default batching config (batches form: 64 in flight)
  +metrics    the same plus a Prometheus endpoint and OTLP metrics (every 10 s: no export falls in a
              round), no traces
  +telemetry  the same and traces at 1 % (exported every 5 s, or at 512 spans waiting)

and each figure twice: the process's CPU (every thread: the span exporter's too) and the event loop
thread's alone (`time.thread_time`), each telemetry row also minus `batching`, paired by round.

The gateway's own stages alone (no gRPC, no sockets) are `bench_hot_path.py`; the upstream client
alone is `bench_upstream.py`; Envoy's whole process under real load is `bench_gateway.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
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
TRACE_RATIO = 0.01  # bench_gateway.py's TELEMETRY_CONFIG
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


async def _drive(handle, requests: int) -> tuple[float, float]:
    """CPU µs per request of `handle()` run `requests` times, CONCURRENCY at once, a task each:
    (the process's, the calling thread's)."""
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

    started, started_thread = time.process_time(), time.thread_time()
    for _ in range(requests):
        await slots.acquire()
        loop.create_task(handle()).add_done_callback(done)
    await finished.wait()
    return ((time.process_time() - started) / requests * 1e6, (time.thread_time() - started_thread) / requests * 1e6)


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


async def _measure(triton_grpc: str, requests: int, rounds: int, otlp: str | None) -> dict[str, list]:
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [triton_grpc]}},
              "batching": {"default": {"enabled": False}}}
    body = frame(build_infer_request(MODEL))
    reply = pb.ModelInferResponse(model_name=MODEL, model_version="1", id="").SerializeToString() + b"\x00" * 80

    async def canned(request, call):
        return reply

    engine = _caller(GrpcAsgiApp([Method(PATH, False, canned)]), body)
    gateways = {"gateway": config}
    if otlp is not None:
        batching = {key: value for key, value in config.items() if key != "batching"}  # the default config
        metrics = {"prometheus_port": 0, "prometheus_host": "127.0.0.1", "otlp_endpoint": otlp}
        gateways["batching"] = batching
        gateways["+metrics"] = {**batching, "telemetry": {**metrics, "trace_sampling_ratio": 0.0}}
        gateways["+telemetry"] = {**batching, "telemetry": {**metrics, "trace_sampling_ratio": TRACE_RATIO}}
    opened = []
    try:
        runs = {"driver": _yield_once, "engine": engine}
        for name, gateway_config in gateways.items():
            services = envoy_services(json.dumps(gateway_config))
            opened.append(services)
            runs[name] = _caller(GrpcAsgiApp(await services.__aenter__()), body)
            await _drive(runs[name], 3000)  # warm: connections open, layouts and templates cached
        figures: dict[str, list] = {name: [] for name in runs}
        for index in range(rounds):
            order = list(runs) if index % 2 == 0 else list(reversed(runs))
            for name in order:
                figures[name].append(await _drive(runs[name], requests))
        return figures
    finally:
        for services in opened:
            await services.__aexit__(None, None, None)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--telemetry", action="store_true", help="also the gateway with metrics, and with metrics and 1 %% traces")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    print(machine("uvloop", "grpc"))
    receiver = otlp = None
    if args.telemetry:
        receiver = subprocess.Popen([sys.executable, "-m", "gateway.bench.otlp_receiver"], stdout=subprocess.PIPE,
                                    text=True, cwd=Path(__file__).resolve().parents[1])
        otlp = receiver.stdout.readline().split("otlp receiver on ", 1)[1].split()[0]
    triton = LocalTriton(default_model_repository(), name="bench-app-inprocess").start()
    try:
        figures = uvloop.run(_measure(triton.grpc_address, args.requests, args.rounds, otlp))
    finally:
        triton.stop()
        if receiver is not None:
            receiver.terminate()
            receiver.wait()
    print(f"\nCPU µs per request, {args.requests} requests × {args.rounds} rounds, {CONCURRENCY} in flight: "
          "median [min–max]; net = minus the driver's median; added = minus `batching`, paired by round")
    for clock, index in (("the process (every thread)", 0), ("the event loop's thread", 1)):
        print(f" {clock}:")
        column = {name: [round_[index] for round_ in rounds_] for name, rounds_ in figures.items()}
        floor = statistics.median(column["driver"])
        for name, values in column.items():
            net = "" if name == "driver" else f"   net {statistics.median(values) - floor:.1f}"
            added = ""
            if name.startswith("+"):
                paired = [a - b for a, b in zip(values, column["batching"])]
                added = f"   added {statistics.median(paired):+.2f} [{min(paired):+.1f}–{max(paired):+.1f}]"
            print(f"  {name:10s} {_spread(values)}{net}{added}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
