"""Faults and overload, measured: what the gateway holds while backends die or hang and clients overload it.

    python benchmarks/bench_resilience.py [--engine envoy|grpcio] [--only kill,stop,overload,memory]

Real Tritons from the wheel and the real gateway on loopback; the clients run in processes of their
own (a client in the gateway's process would share its GIL). Sections:

  kill      4 clients in a loop on `simple_scale` (1×16 FP32, deadline 10 s) through a gateway
            over two Tritons; one is SIGKILLed, restarted 1.5 s later: requests, failures, and how
            long after its return the gateway sends it requests again
  stop      the same, one Triton SIGSTOPped for 3 s, then SIGCONTed: how long until it is out of
            rotation, failures, the slowest request (one pending on the hung backend is moved),
            requests failed over, and how long after SIGCONT it serves again
  overload  `fixed_cost` (2 ms a request, batching off), admission max_inflight 8 for the model,
            80 clients in a closed loop (10× the limit) for 5 s, honouring grpc-retry-pushback-ms:
            served and shed, latency of each (p50, p99, client-side), the gateway's peak RSS
  memory    one request of 1, 8 and 56 MiB (`bytes_reverse`, one BYTES element; its answer is as
            large) at a time: the gateway process's peak RSS above its resting RSS; then 1,000
            concurrent 1 MiB requests (50 channels) under admission.max_request_bytes 64 MiB and
            under no bound (1 TiB): peak RSS, shed

The machine is shared (other engineers' tests and benchmarks run on the same 2 cores): latencies
are upper bounds of what the gateway does alone; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.local.triton import LocalTriton, default_model_repository  # noqa: E402
from gateway.protocol import pb  # noqa: E402
from gateway.testing import EnvoyGatewayThread, GatewayThread  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
BIG = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


def tritons(count: int, prefix: str) -> list[LocalTriton]:
    servers = [LocalTriton(default_model_repository(), name=f"{prefix}-{i}", log_dir=tempfile.mkdtemp())
               for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda s: s.start(), servers))
    return servers


def gateway(engine: str, config: dict):
    return EnvoyGatewayThread(config) if engine == "envoy" else GatewayThread(config)


def gateway_pid(engine: str, thread) -> int:
    return thread.gateway.engine.pid if engine == "envoy" else os.getpid()


def request_bytes(model: str, size: int | None = None) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    if model == "bytes_reverse":
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(size.to_bytes(4, "little") + b"x" * size)
    else:
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request.SerializeToString()


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p99 = np.quantile(np.array(values) * 1e3, [0.5, 0.99])
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


def peak_rss(pid: int) -> int:
    return _status(pid, "VmHWM")


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


# ---- clients (in a process of their own) ---------------------------------------------------------

def _loop_clients(address: str, body: bytes, clients: int, seconds: float, deadline_s: float,
                  honour_pushback: bool, channels: int = 1, shots: int = 0) -> list:
    """`clients` callers in a closed loop for `seconds` (or each `shots` calls): (code, seconds, sent at)."""

    async def main() -> list:
        outcomes: list = []
        opened = [grpc.aio.insecure_channel(address, options=BIG) for _ in range(channels)]
        calls = [channel.unary_unary(INFER) for channel in opened]
        end = time.monotonic() + seconds

        async def client(index: int) -> None:
            call, done = calls[index % channels], 0
            while (time.monotonic() < end) if not shots else done < shots:
                began = time.monotonic()
                try:
                    await call(body, timeout=deadline_s)
                    outcomes.append(("OK", time.monotonic() - began, began))
                except grpc.aio.AioRpcError as error:
                    outcomes.append((error.code().name, time.monotonic() - began, began))
                    pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    if honour_pushback and pushback is not None:
                        await asyncio.sleep(int(pushback) / 1e3)
                done += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        for channel in opened:
            await channel.close()
        return outcomes

    return asyncio.run(main())


def clients_in_process(*args, **kwargs) -> concurrent.futures.Future:
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = pool.submit(_loop_clients, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def served_by(thread, engine: str, address: str) -> int:
    return thread.snapshot()["backends"][address]["served"]


def wait_for(predicate, timeout: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.02)
    return None


# ---- sections ------------------------------------------------------------------------------------

def fault(engine: str, kind: str) -> None:
    pair = tritons(2, f"bench-{kind}")
    victim = pair[0]
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [t.grpc_address for t in pair]}},
              "health": {"interval_s": 0.2, "timeout_s": 0.5}}
    try:
        with gateway(engine, config) as thread:
            seconds = 30.0 if kind == "kill" else 14.0  # a restarted Triton takes seconds to be ready
            load = clients_in_process(thread.address, request_bytes("simple_scale"), 4, seconds, 10.0, False)
            wait_for(lambda: all(served_by(thread, engine, t.grpc_address) > 50 for t in pair), 30)
            began = time.monotonic()
            if kind == "kill":
                victim.kill()
                time.sleep(1.5)
                victim.start()
                returned = time.monotonic()
                base = served_by(thread, engine, victim.grpc_address)
                rejoined = wait_for(lambda: served_by(thread, engine, victim.grpc_address) > base, 15)
                detail = (f"restarted and ready {returned - began:.1f} s after the kill; rejoined {rejoined:.2f} s "
                          f"after it was ready" if rejoined is not None else "did not rejoin")
            else:
                os.kill(victim.pid, signal.SIGSTOP)

                def out() -> bool:
                    state = thread.snapshot()["backends"][victim.grpc_address]
                    return state["ejected"] or state["health"] != "healthy"

                out_after = wait_for(out, 10)
                time.sleep(max(0.0, 3.0 - (time.monotonic() - began)))
                os.kill(victim.pid, signal.SIGCONT)
                base = served_by(thread, engine, victim.grpc_address)
                rejoined = wait_for(lambda: served_by(thread, engine, victim.grpc_address) > base, 15)
                moved = thread.snapshot()["resilience"]
                detail = (f"out of rotation {out_after:.2f} s after SIGSTOP; {moved['failovers']} pending requests "
                          f"failed over; rejoined {rejoined:.2f} s after SIGCONT" if rejoined is not None and out_after
                          else f"out after {out_after}, rejoined after {rejoined}")
            outcomes = load.result(120)
    finally:
        for server in pair:
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)
            server.stop()
    failed = [code for code, _, _ in outcomes if code != "OK"]
    slowest = max(seconds for _, seconds, _ in outcomes)
    print(f"{engine:7s} {kind:5s}: {len(outcomes)} requests over {seconds:.0f} s, {len(failed)} failed "
          f"({sorted(set(failed))}), slowest {slowest * 1e3:.0f} ms; {detail}", flush=True)


def overload(engine: str) -> None:
    (server,) = tritons(1, "bench-overload")
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [server.grpc_address]}},
              "batching": {"models": {"fixed_cost": {"enabled": False}}},
              "admission": {"model_default": {"max_inflight": 8}, "retry_pushback_ms": 100}}
    try:
        with gateway(engine, config) as thread:
            pid = gateway_pid(engine, thread)
            _loop_clients(thread.address, request_bytes("fixed_cost"), 4, 1.0, 10.0, True)  # warm
            resting = rss(pid)
            reset_peak(pid)
            load = clients_in_process(thread.address, request_bytes("fixed_cost"), 80, 5.0, 10.0, True)
            # A probe in a process of its own, one call at a time, not waiting out the pushback: what
            # a shed request costs a client whose own event loop is not itself overloaded (the 80
            # clients above share one loop, and their latencies include waiting for it).
            probe = clients_in_process(thread.address, request_bytes("fixed_cost"), 1, 5.0, 10.0, False)
            outcomes, probed = load.result(120), probe.result(120)
            peak = peak_rss(pid)
    finally:
        server.stop()
    served = [s for code, s, _ in outcomes if code == "OK"]
    shed = [s for code, s, _ in outcomes if code == "RESOURCE_EXHAUSTED"]
    other = [code for code, _, _ in outcomes if code not in ("OK", "RESOURCE_EXHAUSTED")]
    print(f"{engine:7s} overload: {len(served)} served ({len(served) / 5:.0f}/s; {quantiles(served)}), "
          f"{len(shed)} shed ({quantiles(shed)}), {len(other)} other errors; gateway RSS {resting / 2**20:.0f} MiB "
          f"resting, peak +{(peak - resting) / 2**20:.0f} MiB", flush=True)
    probe_shed = [s for code, s, _ in probed if code == "RESOURCE_EXHAUSTED"]
    print(f"{engine:7s} overload, the probe: {len(probed)} calls, {len(probe_shed)} shed ({quantiles(probe_shed)}"
          f", p90 {np.quantile(probe_shed, 0.9) * 1e3 if probe_shed else float('nan'):.1f} ms), "
          f"{len(probed) - len(probe_shed)} served or other", flush=True)


def memory(engine: str) -> None:
    (server,) = tritons(1, "bench-memory")
    try:
        for bound in (64 << 20, 1 << 40):
            config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [server.grpc_address]}},
                      "server": {"max_message_bytes": 256 << 20}, "admission": {"max_request_bytes": bound}}
            with gateway(engine, config) as thread:
                pid = gateway_pid(engine, thread)
                if bound == 64 << 20:
                    for mib in (1, 8, 56):
                        body = request_bytes("bytes_reverse", mib << 20)
                        _loop_clients(thread.address, body, 1, 0, 120.0, False, shots=1)  # warm
                        time.sleep(0.3)
                        resting = rss(pid)
                        reset_peak(pid)
                        _loop_clients(thread.address, body, 1, 0, 120.0, False, shots=1)
                        print(f"{engine:7s} memory: one {mib} MiB request (and its {mib} MiB answer): peak RSS "
                              f"+{(peak_rss(pid) - resting) / 2**20:.0f} MiB", flush=True)
                body = request_bytes("bytes_reverse", 1 << 20)
                time.sleep(0.3)
                resting = rss(pid)
                reset_peak(pid)
                outcomes = clients_in_process(thread.address, body, 1000, 0, 120.0, False, channels=50,
                                              shots=1).result(300)
                peak, after = peak_rss(pid), rss(pid)
            codes = {}
            for code, _, _ in outcomes:
                codes[code] = codes.get(code, 0) + 1
            label = "64 MiB" if bound == 64 << 20 else "none"
            print(f"{engine:7s} memory: 1,000 concurrent 1 MiB requests, max_request_bytes {label}: {codes}; "
                  f"peak RSS +{(peak - resting) / 2**20:.0f} MiB, after +{(after - resting) / 2**20:.0f} MiB", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("envoy", "grpcio"), default="envoy")
    parser.add_argument("--only", default="kill,stop,overload,memory")
    args = parser.parse_args()
    print(f"# bench_resilience, engine {args.engine}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for section in args.only.split(","):
        if section in ("kill", "stop"):
            fault(args.engine, section)
        elif section == "overload":
            overload(args.engine)
        elif section == "memory":
            memory(args.engine)


if __name__ == "__main__":
    main()
