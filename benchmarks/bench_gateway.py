"""End-to-end benchmark: the gateway against direct Triton and a bare grpc.aio echo server, one run.

    python benchmarks/bench_gateway.py [--quick] [--json OUT] [--gateway-env NAME=VALUE ...]

`--gateway-env` sets variables in the gateway process alone, for gRPC settings that only the
environment reaches (GRPC_EXPERIMENTS, GRPC_POLL_STRATEGY, …): gRPC reads them when it is imported.

Starts one local Triton with the example models, the gateway (`tensorgate serve`) in front of it and
the echo server, each a process of its own; the load generator is a process of its own too. Then,
in rounds that alternate the order of baseline and subject, measures on `simple_scale` with 1×16
FP32 requests:

  (a) the gateway process's CPU µs per request at 64 in flight, against the echo server's (the cost
      of a bare grpc.aio server on uvloop) at the same load;
  (b) requests/s through the gateway ÷ requests/s direct to Triton, 64 in flight;
  (c) the p50 and p99 latency the gateway adds at concurrency 1.

Prints medians over rounds (min–max in brackets) of the per-round ratios, each next to its target.
Client, gateway and Triton share this machine's cores, so absolute figures move with the machine;
the ratios, measured back to back, are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.bench.loadgen import LoadResult, run_load_in_subprocess  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository, find_free_port  # noqa: E402

MODEL = "simple_scale"
ROWS, COLS = 1, 16
HIGH_CONCURRENCY = 64

# Targets: name -> (comparison, value). None: no target set yet, the figure is reported only.
TARGETS = {
    "cpu_ratio": ("<=", 1.5),
    "rps_ratio": None,
    "added_p50_ms": None,
    "added_p99_ms": None,
}
# Reference points from DESIGN.md ("What a Python hop costs"), a naive grpc.aio pass-through proxy.
NAIVE_PROXY = {
    "cpu_ratio": "~2.2–2.9 (323–420 µs vs 147)",
    "rps_ratio": "~0.35–0.45",
    "added_p50_ms": "~+0.7 ms",
    "added_p99_ms": "",
}


# ------------------------------------------------------------------------------------ processes


def _wait_for_line(proc: subprocess.Popen, log_path: Path, marker: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args} did not print {marker!r} within {timeout:.0f} s:\n{text[-3000:]}")


def _spawn(args: list[str], log_path: Path, marker: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=None if env is None else {**os.environ, **env})  # fmt: skip
    log.close()
    try:
        _wait_for_line(proc, log_path, marker, timeout=60)
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_serving(target: str, what: str, timeout: float = 60.0) -> None:
    """Until `target` answers ModelInfer for MODEL without errors (the gateway learns models async)."""
    deadline = time.monotonic() + timeout
    while True:
        result = run_load_in_subprocess(target, MODEL, concurrency=1, requests=20, warmup_seconds=0, rows=ROWS, cols=COLS)
        if result.errors == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} at {target} still failing after {timeout:.0f} s: {result.error_samples}")
        time.sleep(0.5)


# -------------------------------------------------------------------------------------- figures


def _load(target: str, concurrency: int, seconds: float, warmup: float, cpu_pids: list[int]) -> LoadResult:
    result = run_load_in_subprocess(
        target, MODEL, concurrency=concurrency, seconds=seconds, warmup_seconds=warmup,
        rows=ROWS, cols=COLS, cpu_pids=cpu_pids,
    )  # fmt: skip
    if result.errors:
        print(f"  warning: {result.errors} errors from {target}: {result.error_samples}", file=sys.stderr)
    return result


def _round(index: int, addresses: dict[str, str], pids: dict[str, int], seconds: float, warmup: float) -> dict[str, LoadResult]:
    """One round: every (target, concurrency) once; odd rounds run them in reverse order."""
    plan = [
        ("echo@64", "echo", HIGH_CONCURRENCY, [pids["echo"]]),
        ("gateway@64", "gateway", HIGH_CONCURRENCY, [pids["gateway"], pids["triton"]]),
        ("direct@64", "direct", HIGH_CONCURRENCY, [pids["triton"]]),
        ("direct@1", "direct", 1, [pids["triton"]]),
        ("gateway@1", "gateway", 1, [pids["gateway"], pids["triton"]]),
    ]
    if index % 2:
        plan.reverse()
    results = {}
    for label, target, concurrency, cpu_pids in plan:
        results[label] = _load(addresses[target], concurrency, seconds, warmup, cpu_pids)
        print(f"  round {index + 1} {label:<11} {results[label].summary()}", flush=True)
    return results


def _figures(results: dict[str, LoadResult], pids: dict[str, int]) -> dict[str, float]:
    echo, gw64, direct64 = results["echo@64"], results["gateway@64"], results["direct@64"]
    gw1, direct1 = results["gateway@1"], results["direct@1"]
    return {
        "echo_cpu_us": echo.cpu_us_per_request(pids["echo"]),
        "gateway_cpu_us": gw64.cpu_us_per_request(pids["gateway"]),
        "cpu_ratio": gw64.cpu_us_per_request(pids["gateway"]) / echo.cpu_us_per_request(pids["echo"]),
        "triton_cpu_us_direct": direct64.cpu_us_per_request(pids["triton"]),
        "triton_cpu_us_via_gateway": gw64.cpu_us_per_request(pids["triton"]),
        "client_cpu_us_direct": direct64.client_cpu_seconds / direct64.requests * 1e6,
        "client_cpu_us_via_gateway": gw64.client_cpu_seconds / gw64.requests * 1e6,
        "direct_rps": direct64.rps,
        "gateway_rps": gw64.rps,
        "echo_rps": echo.rps,
        "rps_ratio": gw64.rps / direct64.rps,
        "direct_p50_ms_c64": direct64.p50_ms,
        "gateway_p50_ms_c64": gw64.p50_ms,
        "direct_p50_ms": direct1.p50_ms,
        "gateway_p50_ms": gw1.p50_ms,
        "added_p50_ms": gw1.p50_ms - direct1.p50_ms,
        "direct_p99_ms": direct1.p99_ms,
        "gateway_p99_ms": gw1.p99_ms,
        "added_p99_ms": gw1.p99_ms - direct1.p99_ms,
        "errors": sum(r.errors for r in results.values()),
    }


def _summarize(per_round: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(r[key] for r in per_round),
            "min": min(r[key] for r in per_round),
            "max": max(r[key] for r in per_round),
        }
        for key in per_round[0]
    }


def _verdict(key: str, value: float) -> tuple[str, str]:
    target = TARGETS.get(key)
    if target is None:
        return "none set", ""
    op, bound = target
    ok = value <= bound if op == "<=" else value >= bound
    return f"{'≤' if op == '<=' else '≥'} {bound:g}", "met" if ok else "MISSED"


def _table(summary: dict[str, dict[str, float]], rounds: int) -> str:
    def med(key: str, fmt: str) -> str:
        return format(summary[key]["median"], fmt)

    def spread(key: str, fmt: str) -> str:
        s = summary[key]
        return f"{format(s['median'], fmt)} [{format(s['min'], fmt)}–{format(s['max'], fmt)}]" if rounds > 1 else format(s["median"], fmt)

    rows = [
        ("(a) CPU µs/request, 64 in flight", f"echo {med('echo_cpu_us', '.0f')}", f"{med('gateway_cpu_us', '.0f')}",
         f"×{spread('cpu_ratio', '.2f')}", "cpu_ratio"),
        ("(b) requests/s, 64 in flight", f"direct {med('direct_rps', ',.0f')}", f"{med('gateway_rps', ',.0f')}",
         f"×{spread('rps_ratio', '.2f')}", "rps_ratio"),
        ("(c) p50 latency, concurrency 1", f"direct {med('direct_p50_ms', '.3f')} ms", f"{med('gateway_p50_ms', '.3f')} ms",
         f"{spread('added_p50_ms', '+.3f')} ms", "added_p50_ms"),
        ("    p99 latency, concurrency 1", f"direct {med('direct_p99_ms', '.3f')} ms", f"{med('gateway_p99_ms', '.3f')} ms",
         f"{spread('added_p99_ms', '+.3f')} ms", "added_p99_ms"),
    ]  # fmt: skip
    header = ("measure", "baseline", "gateway", "ratio / added", "target", "", "naive proxy (DESIGN.md)")
    lines = []
    body = []
    for title, base, subject, ratio, key in rows:
        target, verdict = _verdict(key, summary[key]["median"])
        body.append((title, base, subject, ratio, target, verdict, NAIVE_PROXY.get(key, "")))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    for row in [header, *body]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"context (medians): Triton server CPU µs/request {med('triton_cpu_us_direct', '.0f')} direct, "
        f"{med('triton_cpu_us_via_gateway', '.0f')} via gateway (Python stub not counted); "
        f"load-generator CPU µs/request {med('client_cpu_us_direct', '.0f')} direct, "
        f"{med('client_cpu_us_via_gateway', '.0f')} via gateway; echo {med('echo_rps', ',.0f')} req/s; "
        f"p50 at 64 in flight {med('direct_p50_ms_c64', '.2f')} ms direct, {med('gateway_p50_ms_c64', '.2f')} ms via gateway"
    )
    return "\n".join(lines)


def _machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": str(os.cpu_count()), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}  # fmt: skip


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per measurement")
    parser.add_argument("--rounds", type=int, help="rounds, alternating order (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (default 4, --quick 2)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each window (default 1, --quick 0.5)")
    parser.add_argument("--streams", type=int, help="gateway upstream.streams_per_backend (default: the gateway's)")
    parser.add_argument("--gateway-env", metavar="NAME=VALUE", action="append", default=[],
                        help="environment variable for the gateway process only (repeatable), e.g. GRPC_EXPERIMENTS=…")
    parser.add_argument("--json", metavar="OUT", help="write the figures and every raw result to OUT")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)

    workdir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-"))
    triton = gateway = echo = None
    try:
        triton = LocalTriton(default_model_repository(), name="bench-triton", log_dir=workdir).start()
        gateway_port, echo_port = find_free_port(), find_free_port()
        config = workdir / "gateway.yaml"
        gateway_config = {"listen": f"127.0.0.1:{gateway_port}", "pools": {"cpu": {"backends": [triton.grpc_address]}}}
        if args.streams:
            gateway_config["upstream"] = {"streams_per_backend": args.streams}
        config.write_text(json.dumps(gateway_config))  # JSON is YAML
        gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
        gateway = _spawn([sys.executable, "-m", "gateway", "serve", "--config", str(config)], workdir / "gateway.log",
                         "tensorgate serving on", gateway_env)  # fmt: skip
        echo = _spawn([sys.executable, "-m", "gateway.bench.echo", "--port", str(echo_port)], workdir / "echo.log",
                      "echo serving on")  # fmt: skip
        addresses = {"direct": triton.grpc_address, "gateway": f"127.0.0.1:{gateway_port}", "echo": f"127.0.0.1:{echo_port}"}
        pids = {"triton": triton.pid, "gateway": gateway.pid, "echo": echo.pid}
        for name, address in addresses.items():
            _wait_serving(address, name)
        print(f"bench: {MODEL} {ROWS}×{COLS} FP32, {rounds} round(s) × {seconds:g} s (+{warmup:g} s warm-up); "
              f"pids {pids}; logs in {workdir}", flush=True)  # fmt: skip

        raw_rounds = []
        per_round = []
        for index in range(rounds):
            results = _round(index, addresses, pids, seconds, warmup)
            raw_rounds.append({label: asdict(result) for label, result in results.items()})
            per_round.append(_figures(results, pids))
        summary = _summarize(per_round)
    finally:
        _stop(gateway)
        _stop(echo)
        if triton is not None:
            triton.stop()

    machine = _machine()
    print()
    print(f"tensorgate gateway benchmark — {MODEL}, {ROWS}×{COLS} FP32; {rounds} round(s) × {seconds:g} s; "
          f"median [min–max] of per-round figures; {machine['cpus']} CPUs ({machine['cpu_model']}), "
          f"Python {machine['python']}")  # fmt: skip
    print(_table(summary, rounds))
    if summary["errors"]["max"]:
        print("WARNING: requests failed during measurement (see the round lines above)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine,
            "settings": {"model": MODEL, "rows": ROWS, "cols": COLS, "rounds": rounds, "seconds": seconds,
                         "warmup": warmup, "high_concurrency": HIGH_CONCURRENCY,
                         "gateway_config": gateway_config, "gateway_env": gateway_env},
            "targets": {k: (list(v) if v else None) for k, v in TARGETS.items()},
            "figures": {key: value["median"] for key, value in summary.items()},
            "spread": summary,
            "per_round": per_round,
            "raw": raw_rounds,
        }, indent=2))  # fmt: skip
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
