"""What authentication, rates and request limits cost a request, in-process (CPU per call).

    python benchmarks/bench_security.py [--rounds R] [--calls N]
    python benchmarks/bench_security.py --end-to-end [--rounds R] [--seconds S] [--rate RPS]

In-process (the default): each figure is the CPU time (`time.process_time`) of N calls in a loop, median [min–max] over R
rounds, per call:

  auth off        the ModelInfer handler an engine is given when `auth` and `limits` are absent:
                  the same function object as before security existed (checked), so 0 by design
  authenticate    TenantDirectory.authenticate on a grpc.aio-style metadata tuple of 6 entries with
                  `authorization: Bearer <32-byte token>`: header scan, SHA-256, dict lookup,
                  hmac.compare_digest
  authenticate, envoy headers  the same, with the request's headers as the envoy engine hands
                  them to Call (a dict: one lookup instead of the scan)
  + rate          the same plus the tenant's token-bucket update (Guard.admit_call)
  model check     Guard.check_infer without limits: the tenant's allow-list (a set lookup)
  limits          Guard.check_infer with max_tensors, max_bytes_element_bytes and a per-model
                  message limit, on a 1×16 FP32 request (no BYTES walk) and on a 64-element BYTES
                  request (the Cython walk)
  wrapped handler server/access.py's unary wrapper (authenticate + rate, then await) around a
                  handler that returns at once, driven by `coroutine.send(None)`; the bare handler
                  beside it; "wrapper layer alone" = wrapped - bare - (authenticate + rate)

Compare with the gateway's whole CPU per request in benchmarks/RESULTS.md (hundreds of µs).

End to end (`--end-to-end`): one local Triton and two gateways (`tensorgate serve`, each its own
process, the default engine, batching off), one without `auth`/`limits` and one with a tenant
(bearer token from the environment, allow-list, a rate far above the load) and limits
(max_tensors, max_bytes_element_bytes, a per-model message limit); the same paced load (1×16 FP32
`simple_scale`, 64 in flight, `--rate` requests/s in total, so CPU per request is compared at
equal throughput) on each, order alternating by round; CPU of the serving process (Envoy's, which
runs the gateway's Python) per request, and the ratio on ÷ off per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gateway's process helpers

from gateway.protocol import pb  # noqa: E402
from gateway.security.config import AuthConfig, LimitsConfig, ModelLimits, RateLimit, Secret, TenantConfig  # noqa: E402
from gateway.security.guard import Guard  # noqa: E402
from gateway.server import interpreter  # noqa: E402
from gateway.server.access import guarded  # noqa: E402
from gateway.server.rpc import Call, Method  # noqa: E402

TOKEN = "x" * 43  # secrets.token_urlsafe(32) is 43 characters


def _metadata() -> tuple:
    return (("user-agent", "grpc-python/1.85.3 grpc-c/44.0.0 (linux; chttp2)"), ("authorization", f"Bearer {TOKEN}"),
            ("grpc-accept-encoding", "identity, deflate, gzip"), ("te", "trailers"),
            ("content-type", "application/grpc"), ("x-request-id", "abc"))


def _guard(limits: LimitsConfig | None) -> Guard:
    os.environ["BENCH_SECURITY_TOKEN"] = TOKEN
    tenants = {f"tenant{i}": TenantConfig(models=("other",), tokens=(Secret(env=f"BENCH_SECURITY_{i}"),))
               for i in range(50)}
    for i in range(50):
        os.environ[f"BENCH_SECURITY_{i}"] = f"token-{i}-" + "y" * 30
    tenants["bench"] = TenantConfig(models=("simple_scale", "bytes_reverse"), tokens=(Secret(env="BENCH_SECURITY_TOKEN"),),
                                    rate=RateLimit(requests_per_s=1e12, burst=10**12))
    return Guard(AuthConfig(tenants=tenants), limits)


def _requests() -> tuple[pb.ModelInferRequest, pb.ModelInferRequest]:
    scale = pb.ModelInferRequest(model_name="simple_scale")
    scale.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    scale.raw_input_contents.append(bytes(64))
    text = pb.ModelInferRequest(model_name="bytes_reverse")
    text.inputs.add(name="TEXT", datatype="BYTES", shape=[64, 1])
    text.raw_input_contents.append(b"".join(struct.pack("<I", 12) + b"hello world!" for _ in range(64)))
    return scale, text


def _per_call(function, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - started) / calls * 1e6


def _drive(handler, call: Call):
    def once():
        coroutine = handler(b"", call)
        try:
            coroutine.send(None)
        except StopIteration:
            pass

    return once


def end_to_end(rounds: int, seconds: float, rate: float) -> None:
    import json
    import tempfile

    from bench_gateway import _serving_pid, _spawn, _stop

    from gateway.bench.loadgen import run_load_in_subprocess
    from gateway.local.triton import LocalTriton, default_model_repository, find_free_port

    workdir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-security-"))
    token = "z" * 43
    procs, addresses, pids = {}, {}, {}
    triton = None
    try:
        triton = LocalTriton(default_model_repository(), name="bench-security", log_dir=workdir).start()
        for role in ("off", "on"):
            port = find_free_port()
            config = {"listen": f"127.0.0.1:{port}", "pools": {"cpu": {"backends": [triton.grpc_address]}},
                      "batching": {"default": {"enabled": False}}}
            if role == "on":
                config["auth"] = {"tenants": {"bench": {"tokens": [{"env": "BENCH_SECURITY_TOKEN"}],
                                                        "models": ["simple_scale"],
                                                        "rate": {"requests_per_s": 1e9}}}}
                config["limits"] = {"max_tensors": 64, "max_bytes_element_bytes": 1 << 20,
                                    "models": {"simple_scale": {"max_message_bytes": 1 << 20}}}
            path = workdir / f"{role}.yaml"
            path.write_text(json.dumps(config))
            procs[role] = _spawn([sys.executable, "-m", "gateway", "serve", "--config", str(path)], workdir / f"{role}.log",
                                 "tensorgate serving on", {"BENCH_SECURITY_TOKEN": token})
            addresses[role] = f"127.0.0.1:{port}"
            pids[role] = _serving_pid(procs[role])
        headers = {"off": (), "on": (("authorization", f"Bearer {token}"),)}
        for role in ("off", "on"):
            deadline = time.monotonic() + 60
            while run_load_in_subprocess(addresses[role], "simple_scale", concurrency=1, requests=20, warmup_seconds=0,
                                         headers=headers[role]).errors:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway {role} never served simple_scale; logs in {workdir}")
                time.sleep(0.5)
        print(f"end to end: {rounds} rounds × {seconds:g} s, 64 in flight paced at {rate:g} req/s; logs in {workdir}")
        cpu = {"off": [], "on": []}
        for index in range(rounds):
            order = ("off", "on") if index % 2 == 0 else ("on", "off")
            for role in order:
                result = run_load_in_subprocess(addresses[role], "simple_scale", concurrency=64, seconds=seconds,
                                                warmup_seconds=1.0, cpu_pids=[pids[role]], rate=rate,
                                                headers=headers[role])
                used = result.cpu_seconds.get(pids[role], 0.0) / max(result.requests, 1) * 1e6
                cpu[role].append(used)
                print(f"  round {index + 1} {role:3s}: {result.rps:7.0f} req/s, {result.errors} errors, "
                      f"p50 {result.p50_ms:.2f} ms, gateway CPU {used:.0f} µs/request", flush=True)
        ratios = [on / off for on, off in zip(cpu["on"], cpu["off"])]
        print(f"gateway CPU µs/request: off {statistics.median(cpu['off']):.0f} [{min(cpu['off']):.0f}–{max(cpu['off']):.0f}], "
              f"on {statistics.median(cpu['on']):.0f} [{min(cpu['on']):.0f}–{max(cpu['on']):.0f}], "
              f"on ÷ off ×{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]")
    finally:
        for proc in procs.values():
            _stop(proc)
        if triton is not None:
            triton.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--end-to-end", action="store_true", help="gateways with auth on and off, end to end")
    parser.add_argument("--seconds", type=float, default=4.0, help="--end-to-end: measured seconds per run")
    parser.add_argument("--rate", type=float, default=400.0, help="--end-to-end: paced requests/s in total")
    args = parser.parse_args(argv)
    if args.end_to_end:
        end_to_end(args.rounds, args.seconds, args.rate)
        return 0

    plain_guard = _guard(None)
    limits = LimitsConfig(max_tensors=64, max_bytes_element_bytes=1 << 20,
                          models={"simple_scale": ModelLimits(max_message_bytes=1 << 20)})
    limited_guard = _guard(limits)
    scale, text = _requests()
    metadata = _metadata()
    call = Call(None, metadata, "")
    call.tenant = plain_guard.directory.authenticate(call)
    limited_call = Call(None, metadata, "")
    limited_call.tenant = limited_guard.directory.authenticate(limited_call)

    async def bare(raw: bytes, call: Call) -> bytes:
        return raw

    (wrapped,) = guarded([Method("/inference.GRPCInferenceService/ModelInfer", False, bare)], plain_guard)
    assert guarded([Method("/x/Y", False, bare)], None)[0].handler is bare  # auth off: the handler as it was

    def fresh_call() -> Call:
        return Call(None, metadata, "")

    envoy_headers = {key.encode(): value.encode() for key, value in metadata}

    cases = {
        "authenticate": lambda: plain_guard.directory.authenticate(fresh_call()),
        "authenticate, envoy headers": lambda: plain_guard.directory.authenticate(Call(None, metadata, "", envoy_headers)),
        "authenticate + rate": lambda: plain_guard.admit_call(fresh_call()),
        "model check": lambda: plain_guard.check_infer(call, scale, 100, False),
        "limits, 1×16 FP32": lambda: limited_guard.check_infer(limited_call, scale, 100, False),
        "limits, 64 BYTES elements": lambda: limited_guard.check_infer(limited_call, text, 1100, False),
        "bare handler": _drive(bare, call),
        "wrapped handler": _drive(wrapped.handler, fresh_call()),
        "new Call (baseline)": fresh_call,
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, function in cases.items():
            results[name].append(_per_call(function, args.calls))

    def figure(name: str) -> str:
        values = results[name]
        return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"

    print(f"{interpreter.describe()}, {args.rounds} rounds × {args.calls} calls, µs per call, median [min–max]")
    for name in cases:
        print(f"  {name:28s} {figure(name)}")
    wrapper = [w - b - a for w, b, a in zip(results["wrapped handler"], results["bare handler"],
                                             results["authenticate + rate"])]
    print(f"  {'wrapper layer alone':28s} {statistics.median(wrapper):.2f}  (wrapped - bare - authenticate + rate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
