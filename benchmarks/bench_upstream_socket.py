"""The gateway's CPU per request with its HTTP upstream over a Unix socket, side by side with loopback TCP.

    python benchmarks/bench_upstream_socket.py [--rate R] [--rounds N] [--seconds S]

A Triton on the gateway's own node can serve HTTP on a Unix socket (`--http-address=unix:PATH`);
the gateway then lists it as `http_backends: ["unix:PATH"]`. Two Tritons from the wheel (A: HTTP
on TCP, B: HTTP on a Unix socket) and two pass-through gateways (`tensorgate serve`, batching off,
the default envoy engine), A over TCP to Triton A and B over the socket to Triton B, are loaded
SIDE BY SIDE: two load generators at once, each paced at R req/s over 32 workers, so the machine's
noise hits both alike (one after the other, this machine's drift hides a few %). Reports each
gateway process's CPU µs per request (the Envoy process: all of its threads) and B ÷ A per round,
then the median [min–max]. No target: whether the socket, chosen to keep Triton's HTTP endpoint
off the network, costs or saves CPU (benchmarks/RESULTS.md, "Sixth session": neither, beyond the
noise).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import _serving_pid, _spawn, _stop, _wait_serving  # noqa: E402

from gateway.bench.loadgen import run_load_in_subprocess  # noqa: E402
from gateway.bench.measure import machine  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository, find_free_port  # noqa: E402

MODEL = "simple_scale"
CONCURRENCY = 32


def _gateway(name: str, triton: LocalTriton, over_socket: bool, workdir: Path):
    port = find_free_port()
    pool = {"backends": [triton.grpc_address]}
    if over_socket:
        pool["http_backends"] = [triton.http_address]
    config = {"listen": f"127.0.0.1:{port}", "pools": {"cpu": pool}, "batching": {"default": {"enabled": False}}}
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    proc = _spawn([sys.executable, "-m", "gateway", "serve", "--config", str(path)], workdir / f"{name}.log",
                  "tensorgate serving on")
    address = f"127.0.0.1:{port}"
    _wait_serving(address, name, MODEL)
    return proc, address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="req/s per gateway (default 1500)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per round (+1 s warm-up)")
    args = parser.parse_args(argv)
    print(machine())
    workdir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-socket-"))
    tritons = [LocalTriton(default_model_repository(), name="tcp", log_dir=workdir),
               LocalTriton(default_model_repository(), name="socket", log_dir=workdir,
                           http_unix_socket=workdir / "triton-http.sock")]
    procs = []
    try:
        for triton in tritons:
            triton.start()
        targets = {}
        for name, triton, over_socket in (("A", tritons[0], False), ("B", tritons[1], True)):
            proc, address = _gateway(name, triton, over_socket, workdir)
            procs.append(proc)
            targets[name] = (address, _serving_pid(proc))

        def load(name: str):
            address, pid = targets[name]
            return run_load_in_subprocess(address, MODEL, concurrency=CONCURRENCY, seconds=args.seconds,
                                          warmup_seconds=1.0, cpu_pids=[pid], rate=args.rate)

        print(f"\n{MODEL} 1×16 FP32, each gateway paced at {args.rate:g} req/s over {CONCURRENCY} workers, side by side; "
              f"gateway process CPU µs per request")
        ratios = []
        for index in range(args.rounds):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                a, b = pool.map(load, ("A", "B"))
            a_us, b_us = a.cpu_us_per_request(targets["A"][1]), b.cpu_us_per_request(targets["B"][1])
            ratios.append(b_us / a_us)
            print(f"  round {index + 1}: A (TCP) {a_us:.1f} µs at {a.rps:,.0f} req/s, {a.errors} errors | "
                  f"B (Unix socket) {b_us:.1f} µs at {b.rps:,.0f} req/s, {b.errors} errors | B ÷ A {b_us / a_us:.3f}",
                  flush=True)
        print(f"B ÷ A: ×{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]")
    finally:
        for proc in procs:
            _stop(proc)
        for triton in tritons:
            triton.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
