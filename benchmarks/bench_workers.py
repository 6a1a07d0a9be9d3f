"""Worker processes on one port: how connections spread over them, and requests/s with 1 and N workers.

    python benchmarks/bench_workers.py [--engine envoy|grpcio] [--workers 2] [--trials 40]
                                       [--rounds 2] [--seconds 4] [--clients 4] [--concurrency 16]
                                       [--json OUT]

Starts one local Triton (the wheel's, `simple_scale`: the cheapest real backend here) and
`tensorgate serve --workers N` in front of it (gateway/testing.py WorkersProcess: the real CLI,
parent and workers as processes).

1. Spread: with `--workers` workers, `--trials` times, open C long-lived connections at once (C = 2,
   4, 8, 16; each channel with a subchannel pool of its own, so each is its own TCP connection) and
   ask each connection's worker its id (admin GetSnapshot). Per C: how often one worker got no
   connection at all, and the mean share of the busiest worker (1/N is even).
2. Requests/s: rounds alternate `--workers 1` (the single process, no parent) and `--workers N`;
   each round runs `--clients` load generators at once (gateway/bench/loadgen.py, each a process
   with one channel, so one connection, `--concurrency` in flight), 1×16 FP32 requests, closed
   loop, for `--seconds` after a 1 s warm-up. Figures: total req/s, median [min–max] over rounds,
   and the ratio N ÷ 1 per round. Errors are counted and printed.

Client, gateway workers and Triton share the machine's cores: on a 2-core machine the ratio says
little about scaling (the issue's ≥ 0.7 × N target needs a machine with cores to spare).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE  # noqa: E402
from gateway.admin.gateway_service import Snapshot, SnapshotRequest  # noqa: E402
from gateway.bench.loadgen import run_load_in_subprocess  # noqa: E402
from gateway.bench.measure import table  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository  # noqa: E402
from gateway.testing import WorkersProcess  # noqa: E402

MODEL = "simple_scale"


def _config(triton: LocalTriton) -> dict:
    return {"listen": "127.0.0.1:0", "pools": {"main": {"backends": [triton.grpc_address]}}}


def _worker_of(channel: grpc.Channel) -> int:
    call = channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot", request_serializer=SnapshotRequest.SerializeToString,
                               response_deserializer=Snapshot.FromString)
    return json.loads(call(SnapshotRequest(), timeout=10).json)["worker"]["id"]


def spread(address: str, workers: int, connections: int, trials: int) -> dict:
    """How `connections` simultaneous connections land on `workers` workers, over `trials` tries."""
    starved = 0
    busiest: list[float] = []
    for _ in range(trials):
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        try:
            landed = [_worker_of(channel) for channel in channels]  # all open at once: like long-lived clients
        finally:
            for channel in channels:
                channel.close()
        counts = [landed.count(worker) for worker in range(workers)]
        starved += min(counts) == 0
        busiest.append(max(counts) / connections)
    return {"connections": connections, "trials": trials, "starved_share": starved / trials,
            "busiest_mean": statistics.mean(busiest), "busiest_max": max(busiest)}


def throughput(address: str, clients: int, concurrency: int, seconds: float) -> dict:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: run_load_in_subprocess(address, MODEL, concurrency=concurrency,
                                                                 seconds=seconds, warmup_seconds=1.0),
                                range(clients)))
    return {"rps": sum(r.requests / r.seconds for r in results), "errors": sum(r.errors for r in results),
            "p50_ms": statistics.median(r.p50_ms for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="envoy", choices=("envoy", "grpcio"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()

    triton = LocalTriton(default_model_repository(), name="bench-workers").start()
    out: dict = {"engine": args.engine, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
                 "spread": [], "throughput": []}
    try:
        with WorkersProcess(_config(triton), workers=args.workers, engine=args.engine, verbose=False) as process:
            for connections in (2, 4, 8, 16):
                out["spread"].append(spread(process.address, args.workers, connections, args.trials))
        print(f"\nSpread of simultaneous connections over {args.workers} workers ({args.engine} engine, "
              f"{args.trials} trials each)")
        print(table(["connections", "trials with an idle worker", "busiest worker's share: mean", "max"],
                    [[str(s["connections"]), f"{s['starved_share']:.0%}", f"{s['busiest_mean']:.2f}",
                      f"{s['busiest_max']:.2f}"] for s in out["spread"]]))
        for round_index in range(args.rounds):
            counts = (1, args.workers) if round_index % 2 == 0 else (args.workers, 1)
            row = {}
            for count in counts:
                with WorkersProcess(_config(triton), workers=count, engine=args.engine, verbose=False) as process:
                    time.sleep(1.0)
                    row[count] = throughput(process.address, args.clients, args.concurrency, args.seconds)
            out["throughput"].append(row)
            print(f"round {round_index + 1}: " + ", ".join(
                f"{count} worker(s) {r['rps']:,.0f} req/s (errors {r['errors']}, p50 {r['p50_ms']:.2f} ms)"
                for count, r in sorted(row.items())))
    finally:
        triton.stop()
    one = [row[1]["rps"] for row in out["throughput"]]
    many = [row[args.workers]["rps"] for row in out["throughput"]]
    ratios = [m / o for m, o in zip(many, one)]
    print(f"\nRequests/s, {args.clients} clients × {args.concurrency} in flight, {args.engine} engine")
    print(table(["workers", "req/s median [min–max]", f"÷ 1 worker, per round"],
                [["1", f"{statistics.median(one):,.0f} [{min(one):,.0f}–{max(one):,.0f}]", "—"],
                 [str(args.workers), f"{statistics.median(many):,.0f} [{min(many):,.0f}–{max(many):,.0f}]",
                  f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
