"""Upstream transports side by side: the gateway's CPU per request to send a request to Triton and get its answer.

    python benchmarks/bench_upstream.py [--quick] [--rounds N] [--requests N] [--json OUT]

Targets, each started here: a real Triton from the wheel (`simple_scale`, 1×16 FP32) and the
do-nothing stand-in (`python -m gateway.bench.standin`), which isolates the client's own cost.

Section "client" (the gateway's own upstream code, in a process of its own, no front door): 64
tasks send a fixed number of requests through `gateway.upstream.backend.Backend.infer` — parse
the request bytes, send, answer, serialize the response — over
  grpc-stream  today's InferStream (one ModelStreamInfer stream, grpc.aio)
  http         Triton's HTTP/REST with the binary tensor extension (gateway/upstream/http.py, rest.py)
  h2-probe     not a transport of the gateway's: benchmarks/h2_probe.py, unary ModelInfer over one
               lean multiplexed HTTP/2 connection to Triton's gRPC port, the same work around it
               (parse, serialize the request, send, parse the answer, serialize it)
and, as the baseline, `await` (the same loop with a future resolved on the next loop turn
instead of a backend). CPU µs/request is the process's CPU time (every thread) over the measured
requests; `net` subtracts the baseline's. The target's CPU per request (the tritonserver process
alone, its Python-backend stub not counted; warm-up included) shows what each transport costs
Triton's own front end.

Section "pyvoy" (option (c), Envoy's own HTTP client, which pyvoy exposes only to code running
inside a request it serves — see the report): a pyvoy ASGI front door that parses the gRPC
request and forwards it, loaded by the load generator at 64 in flight; the envoy process's CPU
(Envoy's threads and the embedded Python) per request, with the front's own cost measured in the
same run (`await`):
  grpc-stream / http   the gateway's Backend, as above, inside pyvoy's event loop
  envoy-h2             a gRPC ModelInfer over Envoy's HTTP/2 upstream cluster (pyvoy HTTPTransport)
  envoy-h1             Triton's HTTP binary extension over Envoy's HTTP/1.1 cluster (pyvoy HTTPTransport)
Skipped when pyvoy is not installed (`pip install pyvoy`: it is not a dependency of tensorgate).

Rounds alternate the order of the transports; each figure is the median over rounds with the
min–max. Client, targets and Triton share this machine's cores: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "simple_scale"
CONCURRENCY = 64
CLIENT_TRANSPORTS = ("await", "grpc-stream", "http", "h2-probe")
PYVOY_MODES = ("await", "grpc-stream", "http", "envoy-h2", "envoy-h1")


def _request_bytes() -> bytes:
    from gateway.bench.loadgen import build_infer_request

    return build_infer_request(MODEL, rows=1, cols=16)


# ------------------------------------------------------------------------ section "client" (a child)


async def _drive(transport: str, grpc_address: str, http_address: str, requests: int, warmup: int) -> dict:
    from gateway.protocol import pb
    from gateway.upstream.backend import Backend
    from gateway.upstream.config import UpstreamConfig

    payload = _request_bytes()
    parse = pb.ModelInferRequest.FromString
    loop = asyncio.get_running_loop()
    backend = None
    if transport == "h2-probe":
        from h2_probe import H2Client

        host, _, port = grpc_address.rpartition(":")
        _, probe = await loop.create_connection(
            lambda: H2Client(grpc_address.encode(), b"/inference.GRPCInferenceService/ModelInfer"), host, int(port))
        decode = pb.ModelInferResponse.FromString
    elif transport != "await":
        config = UpstreamConfig(transport="http" if transport == "http" else "grpc-stream")
        backend = Backend(grpc_address, "bench", config, http_address=http_address if transport == "http" else None)
    canned = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    canned.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 16])
    canned.raw_output_contents.append(bytes(64))
    errors: list[str] = []

    async def one() -> None:
        request = parse(payload)
        if transport == "h2-probe":
            response = decode(await probe.request(request.SerializeToString()))
        elif backend is None:
            future = loop.create_future()
            loop.call_soon(future.set_result, canned)
            response = await future
        else:
            response = await backend.infer(request)
        response.SerializeToString()

    async def phase(count: int) -> None:
        remaining = [count]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                try:
                    await one()
                except Exception as error:  # noqa: BLE001 - counted and reported
                    errors.append(repr(error))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    await phase(warmup)
    cpu, wall = time.process_time(), time.perf_counter()
    await phase(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if backend is not None:
        await backend.close()
    if transport == "h2-probe":
        probe.transport.close()
    return {"transport": transport, "requests": requests, "cpu_s": cpu, "wall_s": wall,
            "errors": len(errors), "error_samples": sorted(set(errors))[:3]}


def _client_child(args) -> None:
    os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")  # as tensorgate's CLI sets
    import uvloop

    result = uvloop.run(_drive(args.client, args.grpc, args.http, args.requests, args.warmup))
    print(json.dumps(result), flush=True)


def run_client(transport: str, target: dict, requests: int, warmup: int) -> dict:
    from gateway.bench.cpu import cpu_seconds

    env = {**os.environ, "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", "-event_engine_client")}
    target_cpu = cpu_seconds(target["pid"])
    done = subprocess.run(
        [sys.executable, __file__, "--client", transport, "--grpc", target["grpc"], "--http", target["http"],
         "--requests", str(requests), "--warmup", str(warmup)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client {transport} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The target's CPU over the whole child run (warm-up included): what the transport costs Triton.
    result["target_cpu_us"] = (cpu_seconds(target["pid"]) - target_cpu) / (requests + warmup) * 1e6
    return result


# ------------------------------------------------------------------------- section "pyvoy" (the app)

_state: dict = {}


async def _forward(body: bytes) -> bytes:
    """The ASGI app's work for one gRPC ModelInfer request (body = one gRPC frame): the answer's bytes."""
    from gateway.protocol import pb

    mode = os.environ["TG_BENCH_MODE"]
    request = pb.ModelInferRequest.FromString(body[5:])
    if mode == "await":
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, _state["canned"])
        return (await future).SerializeToString()
    if mode in ("grpc-stream", "http"):
        return (await _state["backend"].infer(request)).SerializeToString()
    client = _state["client"]
    if mode == "envoy-h2":
        answer = await client.post(
            "http://triton/inference.GRPCInferenceService/ModelInfer",
            headers=[("content-type", "application/grpc"), ("te", "trailers")],
            content=b"\x00" + len(body[5:]).to_bytes(4, "big") + body[5:],
        )
        status = answer.trailers.get("grpc-status") or answer.headers.get("grpc-status")
        if status != "0":
            raise RuntimeError(f"grpc-status {status}: {answer.trailers.get('grpc-message')}")
        return pb.ModelInferResponse.FromString(answer.content[5:]).SerializeToString()
    from gateway.upstream.rest import decode_response, encode_request, infer_target

    header, blobs = encode_request(request)
    answer = await client.post(
        "http://triton" + infer_target(request.model_name, request.model_version).decode(),
        headers=[("content-type", "application/octet-stream"), ("inference-header-content-length", str(len(header)))],
        content=b"".join((header, *blobs)),
    )
    length = int(answer.headers.get("inference-header-content-length", "-1"))
    if answer.status != 200:
        raise RuntimeError(f"HTTP {answer.status}: {answer.content[:200]!r}")
    return decode_response(answer.content, length, "triton").SerializeToString()


def _setup_app_state() -> None:
    from gateway.protocol import pb

    mode = os.environ["TG_BENCH_MODE"]
    canned = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    canned.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 16])
    canned.raw_output_contents.append(bytes(64))
    _state["canned"] = canned
    if mode in ("grpc-stream", "http"):
        from gateway.upstream.backend import Backend
        from gateway.upstream.config import UpstreamConfig

        config = UpstreamConfig(transport="http" if mode == "http" else "grpc-stream")
        _state["backend"] = Backend(os.environ["TG_BENCH_GRPC"], "bench", config,
                                    http_address=os.environ["TG_BENCH_HTTP"] if mode == "http" else None)
    elif mode.startswith("envoy"):
        from pyqwest import Client
        from pyvoy.asgi.httpclient import HTTPTransport

        _state["client"] = Client(HTTPTransport("triton"))


async def app(scope, receive, send) -> None:
    """ASGI: a gRPC unary ModelInfer front door (the shape the envoy engine serves), forwarding upstream."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if not _state:
        _setup_app_state()
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        answer, status, detail = await _forward(b"".join(chunks)), b"0", b""
    except Exception as error:  # noqa: BLE001 - reported to the load generator as a status
        answer, status, detail = b"", b"13", repr(error).encode()[:200]
    await send({"type": "http.response.start", "status": 200, "trailers": True,
                "headers": [(b"content-type", b"application/grpc")]})
    if answer:
        await send({"type": "http.response.body", "body": b"\x00" + len(answer).to_bytes(4, "big") + answer,
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    trailers = [(b"grpc-status", status)] + ([(b"grpc-message", detail)] if detail else [])
    await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})


def run_pyvoy(mode: str, target: dict, requests: int) -> dict:
    from pyvoy import HTTPVersion, PyvoyServer, Upstream

    from gateway.bench.loadgen import run_load_in_subprocess

    upstreams = []
    if mode == "envoy-h2":
        upstreams = [Upstream(name="triton", address=target["grpc"], http_version=HTTPVersion.HTTP2)]
    elif mode == "envoy-h1":
        upstreams = [Upstream(name="triton", address=target["http"], http_version=HTTPVersion.HTTP1)]
    env = {"TG_BENCH_MODE": mode, "TG_BENCH_GRPC": target["grpc"], "TG_BENCH_HTTP": target["http"],
           "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", "-event_engine_client")}

    async def measure() -> dict:
        server = PyvoyServer(f"{Path(__file__).stem}:app", port=0, loop="uvloop", upstreams=upstreams, env=env,
                             lifespan=True)
        await server.start()
        try:
            address = f"127.0.0.1:{server.listener_port}"
            pid = server._process.pid  # envoy: its threads and the embedded Python
            result = await asyncio.to_thread(
                run_load_in_subprocess, address, MODEL, concurrency=CONCURRENCY, requests=requests,
                warmup_seconds=1.0, cpu_pids=[pid])
        finally:
            await server.stop()
        return {"transport": mode, "requests": result.requests, "cpu_s": result.cpu_seconds[str(pid)]
                if str(pid) in result.cpu_seconds else result.cpu_seconds[pid],
                "wall_s": result.seconds, "errors": result.errors, "error_samples": result.error_samples}

    return asyncio.run(measure())


# ------------------------------------------------------------------------------------ the run


def _targets(stack):
    from gateway.local.triton import LocalTriton, default_model_repository

    triton = LocalTriton(default_model_repository(), name="bench-upstream").start()
    stack.append(triton.stop)
    standin = subprocess.Popen([sys.executable, "-m", "gateway.bench.standin"], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    stack.append(lambda: (standin.terminate(), standin.wait(10)))
    line = standin.stdout.readline().split()
    return {
        "triton": {"grpc": triton.grpc_address, "http": triton.http_address, "pid": triton.pid},
        "stand-in": {"grpc": line[line.index("grpc") + 1], "http": line[line.index("http") + 1], "pid": standin.pid},
    }


def _summary(runs: list[dict], baseline: list[dict] | None) -> dict:
    cpu = [r["cpu_s"] / r["requests"] * 1e6 for r in runs]
    rps = [r["requests"] / r["wall_s"] for r in runs]
    out = {"cpu_us": statistics.median(cpu), "cpu_us_min": min(cpu), "cpu_us_max": max(cpu),
           "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
           "errors": sum(r["errors"] for r in runs), "error_samples": sorted({e for r in runs for e in r["error_samples"]})[:3]}
    if "target_cpu_us" in runs[0]:
        target = [r["target_cpu_us"] for r in runs]
        out.update(target_us=statistics.median(target), target_us_min=min(target), target_us_max=max(target))
    if baseline is not None:
        net = [c - b["cpu_s"] / b["requests"] * 1e6 for c, b in zip(cpu, baseline)]
        out.update(net_us=statistics.median(net), net_us_min=min(net), net_us_max=max(net))
    return out


def _print_table(title: str, results: dict) -> None:
    from gateway.bench.measure import table

    rows = []
    for target, by_transport in results.items():
        base = by_transport.get("await")
        for transport, s in by_transport.items():
            net = f"{s['net_us']:.0f} [{s['net_us_min']:.0f}–{s['net_us_max']:.0f}]" if "net_us" in s else "—"
            ratio = ""
            if base is not None and transport != "await" and "grpc-stream" in by_transport and "net_us" in s:
                ratio = f"{s['net_us'] / by_transport['grpc-stream']['net_us']:.2f}"
            served = (f"{s['target_us']:.0f} [{s['target_us_min']:.0f}–{s['target_us_max']:.0f}]"
                      if "target_us" in s and transport != "await" else "—")
            rows.append([target, transport, f"{s['cpu_us']:.0f} [{s['cpu_us_min']:.0f}–{s['cpu_us_max']:.0f}]", net,
                         ratio, f"{s['rps']:,.0f} [{s['rps_min']:,.0f}–{s['rps_max']:,.0f}]", served, str(s["errors"])])
    print(f"\n{title}")
    print(table(["target", "transport", "CPU µs/req", "net of await", "÷ grpc-stream", "req/s",
                 "target's CPU µs/req", "errors"], rows))
    for by_transport in results.values():
        for transport, s in by_transport.items():
            if s["errors"]:
                print(f"  {transport} errors: {s['error_samples']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, fewer requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000, help="measured requests per run")
    parser.add_argument("--sections", default="client,pyvoy")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--grpc", help=argparse.SUPPRESS)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_child(args)
        return 0
    if args.quick:
        args.rounds, args.requests = 1, 5000
    from gateway.bench.measure import machine
    from gateway.server import interpreter

    print(f"machine: {machine('grpc')}; {CONCURRENCY} in flight, {args.requests} requests per run, "
          f"{args.rounds} rounds, 1×16 FP32 {MODEL}")
    sections = args.sections.split(",")
    try:
        import pyvoy  # noqa: F401
    except ImportError:
        if "pyvoy" in sections:
            print("section pyvoy skipped: pyvoy is not installed (pip install pyvoy)")
            sections.remove("pyvoy")
    stack: list = []
    report: dict = {"machine": machine("grpc"), "python": interpreter.describe(), "requests": args.requests,
                    "rounds": args.rounds, "concurrency": CONCURRENCY}
    try:
        targets = _targets(stack)
        for section in sections:
            modes, run = (CLIENT_TRANSPORTS, run_client) if section == "client" else (PYVOY_MODES, run_pyvoy)
            raw: dict = {t: {m: [] for m in modes} for t in targets}
            for round_index in range(args.rounds):
                order = list(modes[round_index % len(modes):] + modes[:round_index % len(modes)])
                for target_name, target in targets.items():
                    for mode in order:
                        if section == "client":
                            result = run(mode, target, args.requests, args.warmup)
                        else:
                            result = run(mode, target, args.requests)
                        raw[target_name][mode].append(result)
                        print(f"  {section} round {round_index + 1} {target_name:8} {mode:11} "
                              f"{result['cpu_s'] / max(result['requests'], 1) * 1e6:7.1f} µs/req "
                              f"{result['requests'] / result['wall_s']:8,.0f} req/s errors={result['errors']}",
                              flush=True)
            summary = {t: {m: _summary(runs, by_mode["await"] if m != "await" else None)
                           for m, runs in by_mode.items()} for t, by_mode in raw.items()}
            report[section] = summary
            title = ("client: the gateway's Backend.infer in its own process (process CPU)" if section == "client"
                     else "pyvoy: an ASGI gRPC front door on pyvoy forwarding upstream (envoy process CPU)")
            _print_table(title, summary)
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception:  # noqa: BLE001
                pass
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
