"""End-to-end benchmark: the gateway against direct Triton and a bare grpc.aio echo server, one run.

    python benchmarks/bench_gateway.py [--quick] [--only overhead|batching|drift|telemetry] [--engine envoy|h2|grpcio] [--json OUT]
                                       [--batching JSON] [--gateway-env NAME=VALUE ...] [--upstream-socket]

`--upstream-socket` serves Triton's HTTP endpoint on a Unix socket and every gateway's inference
requests ride it (`http_backends: ["unix:…"]`): a Triton on the gateway's own node. The direct
baseline is unchanged (clients reach Triton over gRPC on TCP either way).

`--gateway-env` sets variables in the gateway processes alone, for gRPC settings that only the
environment reaches (GRPC_EXPERIMENTS, GRPC_POLL_STRATEGY, …): gRPC reads them when it is imported.

Starts one local Triton with the example models (a second one for the side-by-side pair), gateways
(`tensorgate serve`) in front of it — one with gateway batching off (`batching: {default:
{enabled: false}}`, the pass-through path) and one with the default batching config (adaptive;
`--batching` replaces it) — and the echo server, each a process of its own; the load generator is
a process of its own too. Then, in rounds that alternate the order of
baseline and subject, measures with 1×16 FP32 requests:

overhead (`--only overhead`), on `simple_scale`, through the pass-through gateway (batching OFF):
  (a) the gateway process's CPU µs per request at 64 in flight, against the echo server's (the cost
      of a bare grpc.aio server on uvloop) at the same load; also, for information, the batching
      gateway's CPU µs per request at the same load;
  (b) requests/s through the gateway ÷ requests/s direct to Triton, 64 in flight;
  (c) the p50 and p99 latency the gateway adds at concurrency 1;
  (a, side by side) the gateway's CPU µs per request ÷ Triton's, the two loaded AT THE SAME TIME,
      each paced at PAIR_RATE req/s (1,500; TENSORGATE_BENCH_PAIR_RATE) over 64 workers: direct to
      the Triton above, and through a pass-through gateway in front of a second Triton of its own
      (so neither Triton's CPU holds the other's requests). One after the other, Triton's own CPU
      a request moved by more than the gateway's distance to it between runs; side by side the
      machine's noise hits both alike, and at one rate neither is cheaper for being busier. (The
      second Triton and its gateway stay up, idle, through the section's other runs.)

batching (`--only batching`), 64 in flight, through the batching gateway (adaptive, defaults):
  (d) backend-bound: rps via the gateway on `fixed_cost` ÷ rps direct to `fixed_cost` (Triton
      dynamic batching off), and ÷ rps direct to `fixed_cost_dynbatch` (Triton batching on);
      tiny CPU-bound: the same with `simple_scale` / `simple_scale_dynbatch`.
      With each: the mean batch size Triton executed (Δinference_count ÷ Δexecution_count of
      Triton's own ModelStatistics over the run, read with tritonclient) and the gateway's CPU µs
      per request.

drift (`--only drift`), on `simple_scale`: the batching gateway (default batching config) against
  a third gateway with the SAME config plus `drift: {models: {simple_scale: {}}}` (drift defaults:
  every input watched, 16 bins, window 5000 rows, reference learned from the first 5000 rows),
  loaded SIDE BY SIDE like telemetry, each paced at DRIFT_RATE req/s (2,500;
  TENSORGATE_BENCH_DRIFT_RATE) over DRIFT_CONCURRENCY (48) workers. Both are first primed with
  DRIFT_PRIME_REQUESTS requests, so the drift gateway has learned its reference and is evaluating
  windows before anything is measured. Reports each gateway's CPU µs per request and the ratio on ÷
  off (target ≤ 1.05), with req/s. (Loaded one after the other as fast as answered, as this section
  was until 2026-11-29, two rounds of the same pair differed by up to ±20 µs a request on this
  machine: more than the stage costs.)

ab (`--only ab --ab JSON`, never part of a full run): two pass-through gateways (batching off, as
  in overhead), the second with JSON as its `server:` section (on top of --server), loaded SIDE BY
  SIDE like drift, each paced at AB_RATE req/s (1,500; TENSORGATE_BENCH_AB_RATE) over
  AB_CONCURRENCY (32) workers: the CPU per request of a server setting (the collector policy,
  Envoy's threads, …) paired by round, which one gateway after the other this machine's noise
  hides. Reports B ÷ A, no target.

telemetry (`--only telemetry`), on `simple_scale`: the batching gateway (default batching config,
  telemetry off) against a gateway with the SAME config plus metrics and traces, loaded SIDE BY SIDE
  (two load generators at once, so the machine's noise hits both alike), each paced at 400 req/s
  over 32 workers (TENSORGATE_BENCH_TELEMETRY_RATE, _CONCURRENCY; rate 0 = as fast as answered),
  below saturation, so CPU per request is compared at the same throughput:
  TELEMETRY_CONFIG — a Prometheus endpoint scraped every 10 s by this script, OTLP metrics pushed
  every 10 s (the default) and spans at a 1 % sampling ratio, both to an OTLP/gRPC receiver running
  as a process of its own (`python -m gateway.bench.otlp_receiver`, its CPU not counted); runs of
  at least 10 s, so each holds a scrape and an export. Reports
  each gateway's CPU µs per request (exporter threads included) and the ratio on ÷ off (target
  ≤ 1.05), with req/s.

Prints medians over rounds (min–max in brackets) of the per-round ratios, each next to its target.
A target is "met" only when the whole spread clears it (the largest round of a ≤ target, the
smallest of a ≥ one), "MISSED" when the median does not, and "not shown" in between: the rounds
disagree, so the run cannot tell. For a feature (drift, telemetry) the CPU µs it adds per request
(on − off, per round) is printed beside its ratio: a fixed cost reads as a smaller ratio under a
costlier baseline, the µs do not. Client, gateways and Triton share this machine's cores, so
absolute figures move with the machine; the ratios, measured back to back against the same Triton,
are what to compare. Every load checks a sample of its replies (gateway/bench/loadgen.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.bench.cpu import descendants  # noqa: E402
from gateway.bench.loadgen import LoadResult, run_load_in_subprocess  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository, find_free_port  # noqa: E402
from gateway.server import interpreter  # noqa: E402

MODEL = "simple_scale"
ROWS, COLS = 1, 16
HIGH_CONCURRENCY = 64
SECTIONS = ("overhead", "batching", "drift", "telemetry")
#: The roles that are gateways (`tensorgate serve`); "pairgw" fronts a Triton of its own.
GATEWAY_ROLES = ("gateway", "batchgw", "driftgw", "telgw", "abgw", "pairgw")
AB_RATE = float(os.environ.get("TENSORGATE_BENCH_AB_RATE", "1500")) or None
#: The overhead section's side-by-side pair: direct Triton and the pass-through gateway in front of a
#: second Triton of its own, loaded at the same time, each paced at this many requests/s.
PAIR_RATE = float(os.environ.get("TENSORGATE_BENCH_PAIR_RATE", "1500")) or None  # 0: as fast as answered
AB_CONCURRENCY = 32
TELEMETRY_CONCURRENCY = int(os.environ.get("TENSORGATE_BENCH_TELEMETRY_CONCURRENCY", "32"))
# Each gateway gets the same paced load, below what the machine saturates at: CPU per request is
# then compared at equal throughput (closed-loop, a gateway a little slower would also serve fewer
# requests, and CPU per request rises as load falls — the comparison would amplify any difference).
TELEMETRY_RATE = float(os.environ.get("TENSORGATE_BENCH_TELEMETRY_RATE", "400")) or None
# The telemetry section's gateway: every exporter on at its default interval (OTLP every 10 s; the
# endpoint scraped every SCRAPE_S), and traces at the issue's 1 %. Collections cost per second, not
# per request, so each run lasts at least TELEMETRY_SECONDS to hold one of each. "{otlp}" and
# "{metrics_port}" are filled in when the receiver and the gateway's port are known. A harsher
# setting: --telemetry '{"prometheus_port": 0, "otlp_endpoint": "{otlp}", "otlp_interval_s": 1,
# "trace_sampling_ratio": 0.01}' with TENSORGATE_BENCH_SCRAPE_S=1.
TELEMETRY_CONFIG = {"prometheus_port": "{metrics_port}", "prometheus_host": "127.0.0.1", "otlp_endpoint": "{otlp}",
                    "trace_sampling_ratio": 0.01}
SCRAPE_S = float(os.environ.get("TENSORGATE_BENCH_SCRAPE_S", "10"))
TELEMETRY_SECONDS = 10.0
# Requests sent through each drift-section gateway before measuring: more than the drift
# reference's learn_rows (5000 by default), so the measured window is steady-state monitoring.
DRIFT_PRIME_REQUESTS = 8000
DRIFT_CONFIG = {"models": {MODEL: {}}}
# Side by side at the same paced load, as telemetry (see TELEMETRY_RATE), but near the batching
# gateway's working point: a rate each gateway serves with batches forming. 48 in flight: a label
# of its own, apart from the closed-loop runs at HIGH_CONCURRENCY.
DRIFT_RATE = float(os.environ.get("TENSORGATE_BENCH_DRIFT_RATE", "2500")) or None
DRIFT_CONCURRENCY = 48
# Models of the batching section: (gateway model, direct baseline without / with Triton batching).
BATCHING_CASES = {
    "fixed": ("fixed_cost", "fixed_cost_dynbatch"),
    "scale": ("simple_scale", "simple_scale_dynbatch"),
}

# Targets: name -> (comparison, value). None: no target set yet, the figure is reported only.
TARGETS = {
    # The hot-path issue's targets: the whole gateway cheaper than a bare grpc.aio server, no
    # costlier than the Triton server process it fronts (its Python-backend stubs not counted).
    "cpu_ratio": ("<=", 0.8),
    "cpu_ratio_triton": ("<=", 1.0),
    "cpu_ratio_triton_paired": ("<=", 1.0),
    "cpu_ratio_batching_on": None,
    "rps_ratio": None,
    "added_p50_ms": ("<=", 0.5),
    "added_p99_ms": ("<=", 1.0),
    "fixed_vs_direct": (">=", 5.0),
    "fixed_vs_dynbatch": (">=", 0.9),
    "scale_vs_direct": (">=", 1.0),
    "scale_vs_dynbatch": (">=", 1.0),
    "drift_cpu_ratio": ("<=", 1.05),
    "drift_rps_ratio": None,
    "telemetry_cpu_ratio": ("<=", 1.05),
    "telemetry_rps_ratio": None,
}
# Reference points measured on 2026-11-26 (docs/architecture.md, "Measured facts"): a naive grpc.aio pass-through proxy.
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


def _spawn(args: list[str], log_path: Path, marker: str, env: dict[str, str] | None = None,
           timeout: float = 60.0) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=None if env is None else {**os.environ, **env})  # fmt: skip
    log.close()
    try:
        _wait_for_line(proc, log_path, marker, timeout=timeout)
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


class _Scraper:
    """Scrapes a Prometheus endpoint every `interval` seconds from a thread, as a Prometheus server would."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        import threading

        self.url, self.interval = url, interval
        self.scrapes = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1  # the gateway is not up yet, or gone

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _wait_serving(target: str, what: str, model: str = MODEL, timeout: float = 60.0) -> None:
    """Until `target` answers ModelInfer for `model` without errors (the gateway learns models async)."""
    deadline = time.monotonic() + timeout
    while True:
        result = run_load_in_subprocess(target, model, concurrency=1, requests=20, warmup_seconds=0, rows=ROWS, cols=COLS)
        if result.errors == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} at {target} still failing on {model} after {timeout:.0f} s: {result.error_samples}")
        time.sleep(0.5)


def _process_group(pgid: int) -> list[int]:
    """Live processes of group `pgid` (Triton and its Python-backend stubs), read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return sorted(members)


class TritonStats:
    """Triton's own ModelStatistics, read with tritonclient: how many rows (inference_count) and
    executions (execution_count) a model has done, so a run's mean executed batch size is
    Δinference_count ÷ Δexecution_count."""

    def __init__(self, address: str) -> None:
        import tritonclient.grpc

        self._client = tritonclient.grpc.InferenceServerClient(address)

    def counts(self, model: str) -> tuple[int, int]:
        response = self._client.get_inference_statistics(model_name=model)
        rows = executions = 0
        for stats in response.model_stats:
            rows += stats.inference_count
            executions += stats.execution_count
        return rows, executions

    def close(self) -> None:
        self._client.close()


# -------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Run:
    """One load run: `target` (a role in `addresses`), `model`, `concurrency`; CPU watched of
    `watch` (roles) plus, for every target but the echo server, the Triton it reaches and its stubs
    (`pairgw`'s is a second Triton of its own)."""

    target: str
    model: str
    concurrency: int
    together: str = ""  # runs of the same non-empty group run at the same time, each with its own client
    rate: float | None = None  # paced load (requests/s) instead of as fast as answered
    min_seconds: float = 0.0  # the run lasts at least this long, whatever --seconds says

    @property
    def label(self) -> str:
        return f"{self.target}:{self.model}@{self.concurrency}"


def _plan(sections: list[str]) -> list[Run]:
    """Every run of one round, baseline next to subject, without duplicates."""
    runs: list[Run] = []
    if "overhead" in sections:
        runs += [
            Run("echo", MODEL, HIGH_CONCURRENCY),
            Run("gateway", MODEL, HIGH_CONCURRENCY),
            Run("direct", MODEL, HIGH_CONCURRENCY),
            Run("batchgw", MODEL, HIGH_CONCURRENCY),
            Run("direct", MODEL, 1),
            Run("gateway", MODEL, 1),
            # The same ÷ Triton, side by side at an equal rate: the machine's noise (Triton's own CPU
            # a request moved by ±15 % between runs here) then hits both in the same seconds.
            Run("pairdirect", MODEL, HIGH_CONCURRENCY, "pair", PAIR_RATE),
            Run("pairgw", MODEL, HIGH_CONCURRENCY, "pair", PAIR_RATE),
        ]
    if "batching" in sections:
        for model, dynbatch in BATCHING_CASES.values():
            runs += [
                Run("direct", model, HIGH_CONCURRENCY),
                Run("batchgw", model, HIGH_CONCURRENCY),
                Run("direct", dynbatch, HIGH_CONCURRENCY),
            ]
    if "drift" in sections:
        runs += [Run("batchgw", MODEL, DRIFT_CONCURRENCY, "drift", DRIFT_RATE),
                 Run("driftgw", MODEL, DRIFT_CONCURRENCY, "drift", DRIFT_RATE)]
    if "telemetry" in sections:
        # Side by side, half the load each: the machine's noise (other tenants, CPU steal) then hits
        # both gateways in the same seconds, which one after the other it does not.
        runs += [Run("batchgw", MODEL, TELEMETRY_CONCURRENCY, "telemetry", TELEMETRY_RATE, TELEMETRY_SECONDS),
                 Run("telgw", MODEL, TELEMETRY_CONCURRENCY, "telemetry", TELEMETRY_RATE, TELEMETRY_SECONDS)]
    if "ab" in sections:
        runs += [Run("gateway", MODEL, AB_CONCURRENCY, "ab", AB_RATE),
                 Run("abgw", MODEL, AB_CONCURRENCY, "ab", AB_RATE)]
    unique: dict[str, Run] = {}
    for run in runs:
        unique.setdefault(run.label, run)
    return list(unique.values())


def _load(run: Run, addresses: dict[str, str], seconds: float, warmup: float, cpu_pids: list[int]) -> LoadResult:
    result = run_load_in_subprocess(
        addresses[run.target], run.model, concurrency=run.concurrency, seconds=max(seconds, run.min_seconds),
        warmup_seconds=warmup,
        rows=ROWS, cols=COLS, cpu_pids=cpu_pids, rate=run.rate,
    )  # fmt: skip
    if result.errors:
        print(f"  warning: {result.errors} errors from {run.label}: {result.error_samples}", file=sys.stderr)
    if result.requests and not result.checked:
        print(f"  warning: no reply of {run.label} was checked", file=sys.stderr)
    return result


def _round(index: int, plan: list[Run], addresses: dict[str, str], pids: dict[str, int], behind: dict[str, list[int]],
           stats: TritonStats, seconds: float, warmup: float) -> tuple[dict[str, LoadResult], dict[str, float]]:  # fmt: skip
    """One round: every run once; odd rounds run them in reverse order. Also returns, per run, the
    mean batch size Triton executed during it (nan for the echo server). `behind`: per target, the
    pids of the Triton (server and stubs) its requests reach."""
    order = list(reversed(plan)) if index % 2 else plan
    steps: list[list[Run]] = []
    for run in order:
        if run.together and steps and steps[-1][0].together == run.together:
            steps[-1].append(run)
        else:
            steps.append([run])
    results, batch = {}, {}

    def watch(run: Run) -> list[int]:
        watched = [pids[run.target]] if run.target in GATEWAY_ROLES + ("echo",) else []
        return watched + behind[run.target]

    for step in steps:
        if len(step) > 1:  # side by side: Triton's batches are shared, so no batch size per run
            with concurrent.futures.ThreadPoolExecutor(len(step)) as pool:
                loads = list(pool.map(lambda run: _load(run, addresses, seconds, warmup, watch(run)), step))
            for run, result in zip(step, loads):
                results[run.label], batch[run.label] = result, float("nan")
        else:
            run = step[0]
            before = stats.counts(run.model) if run.target != "echo" else None
            results[run.label] = _load(run, addresses, seconds, warmup, watch(run))
            if before is not None:
                after = stats.counts(run.model)
                executions = after[1] - before[1]
                batch[run.label] = (after[0] - before[0]) / executions if executions else float("nan")
            else:
                batch[run.label] = float("nan")
        for run in step:
            _print_run(index, run, results[run.label], batch[run.label], pids, behind[run.target])
    return results, batch


def _print_run(index: int, run: Run, result: LoadResult, batch: float, pids: dict[str, int], triton_pids: list[int]) -> None:
    line = (f"  round {index + 1} {run.label:<32} {result.rps:>8,.0f} req/s  p50 {result.p50_ms:7.3f} ms  "
            f"p99 {result.p99_ms:7.3f} ms  {result.errors} err ({result.checked} replies checked)")  # fmt: skip
    if run.target in pids and run.target != "triton":
        line += f"  {run.target} {result.cpu_us_per_request(pids[run.target]):.0f} CPU µs/req"
    if run.target != "echo":
        line += f"  Triton+stubs {_cpu_us(result, triton_pids):.0f} CPU µs/req  Triton mean batch {batch:.2f}"
    if run.together:
        line += f"  (side by side: {run.together})"
    print(line, flush=True)
    if result.error_samples:
        print(f"    errors: {'; '.join(result.error_samples)}", flush=True)


def _serving_pid(proc: subprocess.Popen) -> int:
    """The process that serves: `proc`, or its Envoy child when it runs the envoy engine."""
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().strip() == "envoy":
                    return pid
        except OSError:
            continue
    return proc.pid


def _cpu_us(result: LoadResult, pids: list[int]) -> float:
    if not result.requests:
        return float("nan")
    return sum(result.cpu_seconds.get(pid, 0.0) for pid in pids) / result.requests * 1e6


def _figures(sections: list[str], results: dict[str, LoadResult], batch: dict[str, float], pids: dict[str, int],
             triton_pids: list[int]) -> dict[str, float]:  # fmt: skip
    def get(target: str, model: str, concurrency: int = HIGH_CONCURRENCY) -> tuple[LoadResult, str]:
        label = Run(target, model, concurrency).label
        return results[label], label

    figures: dict[str, float] = {}
    if "overhead" in sections:
        (echo, _), (gw64, _), (direct64, _) = get("echo", MODEL), get("gateway", MODEL), get("direct", MODEL)
        (bgw64, bgw_label), (gw1, _), (direct1, _) = get("batchgw", MODEL), get("gateway", MODEL, 1), get("direct", MODEL, 1)
        echo_cpu = echo.cpu_us_per_request(pids["echo"])
        figures.update({
            "echo_cpu_us": echo_cpu,
            "gateway_cpu_us": gw64.cpu_us_per_request(pids["gateway"]),
            "cpu_ratio": gw64.cpu_us_per_request(pids["gateway"]) / echo_cpu,
            "cpu_ratio_triton": gw64.cpu_us_per_request(pids["gateway"]) / direct64.cpu_us_per_request(pids["triton"]),
            "batchgw_cpu_us": bgw64.cpu_us_per_request(pids["batchgw"]),
            "cpu_ratio_batching_on": bgw64.cpu_us_per_request(pids["batchgw"]) / echo_cpu,
            "batchgw_rps": bgw64.rps,
            "batchgw_mean_batch": batch[bgw_label],
            "triton_cpu_us_direct": direct64.cpu_us_per_request(pids["triton"]),
            "triton_cpu_us_via_gateway": gw64.cpu_us_per_request(pids["triton"]),
            "triton_all_cpu_us_direct": _cpu_us(direct64, triton_pids),
            "triton_all_cpu_us_via_gateway": _cpu_us(gw64, triton_pids),
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
        })  # fmt: skip
        (pair_direct, _), (pair_gw, _) = get("pairdirect", MODEL), get("pairgw", MODEL)
        figures.update({
            "pair_triton_cpu_us": pair_direct.cpu_us_per_request(pids["triton"]),
            "pair_gateway_cpu_us": pair_gw.cpu_us_per_request(pids["pairgw"]),
            "cpu_ratio_triton_paired": pair_gw.cpu_us_per_request(pids["pairgw"]) / pair_direct.cpu_us_per_request(pids["triton"]),
            "pair_direct_rps": pair_direct.rps,
            "pair_gateway_rps": pair_gw.rps,
        })  # fmt: skip
    if "batching" in sections:
        for case, (model, dynbatch) in BATCHING_CASES.items():
            (direct, d_label), (dyn, y_label), (via, g_label) = get("direct", model), get("direct", dynbatch), get("batchgw", model)
            figures.update({
                f"{case}_direct_rps": direct.rps,
                f"{case}_dynbatch_rps": dyn.rps,
                f"{case}_gateway_rps": via.rps,
                f"{case}_vs_direct": via.rps / direct.rps,
                f"{case}_vs_dynbatch": via.rps / dyn.rps,
                f"{case}_batch_direct": batch[d_label],
                f"{case}_batch_dynbatch": batch[y_label],
                f"{case}_batch_gateway": batch[g_label],
                f"{case}_gateway_cpu_us": via.cpu_us_per_request(pids["batchgw"]),
                f"{case}_triton_all_cpu_us_direct": _cpu_us(direct, triton_pids),
                f"{case}_triton_all_cpu_us_dynbatch": _cpu_us(dyn, triton_pids),
                f"{case}_triton_all_cpu_us_gateway": _cpu_us(via, triton_pids),
                f"{case}_client_cpu_us_gateway": via.client_cpu_seconds / via.requests * 1e6 if via.requests else float("nan"),
                f"{case}_client_cpu_us_direct": direct.client_cpu_seconds / direct.requests * 1e6 if direct.requests else float("nan"),
                f"{case}_p50_ms_direct": direct.p50_ms,
                f"{case}_p50_ms_dynbatch": dyn.p50_ms,
                f"{case}_p50_ms_gateway": via.p50_ms,
                f"{case}_p99_ms_gateway": via.p99_ms,
            })  # fmt: skip
    if "drift" in sections:
        (off, _), (on, _) = get("batchgw", MODEL, DRIFT_CONCURRENCY), get("driftgw", MODEL, DRIFT_CONCURRENCY)
        figures.update(_on_off_figures("drift", off, pids["batchgw"], on, pids["driftgw"]))
    if "telemetry" in sections:
        (off, _), (on, _) = get("batchgw", MODEL, TELEMETRY_CONCURRENCY), get("telgw", MODEL, TELEMETRY_CONCURRENCY)
        figures.update(_on_off_figures("telemetry", off, pids["batchgw"], on, pids["telgw"]))
    if "ab" in sections:
        (a, _), (b, _) = get("gateway", MODEL, AB_CONCURRENCY), get("abgw", MODEL, AB_CONCURRENCY)
        figures.update(_on_off_figures("ab", a, pids["gateway"], b, pids["abgw"]))
    figures["errors"] = sum(r.errors for r in results.values())
    return figures


def _on_off_figures(prefix: str, off: LoadResult, off_pid: int, on: LoadResult, on_pid: int) -> dict[str, float]:
    """A feature's cost: the same gateway config without it (off) and with it (on)."""
    off_cpu, on_cpu = off.cpu_us_per_request(off_pid), on.cpu_us_per_request(on_pid)
    return {
        f"{prefix}_off_cpu_us": off_cpu,
        f"{prefix}_on_cpu_us": on_cpu,
        f"{prefix}_cpu_ratio": on_cpu / off_cpu,
        f"{prefix}_added_cpu_us": on_cpu - off_cpu,
        f"{prefix}_off_rps": off.rps,
        f"{prefix}_on_rps": on.rps,
        f"{prefix}_rps_ratio": on.rps / off.rps,
        f"{prefix}_off_p50_ms": off.p50_ms,
        f"{prefix}_on_p50_ms": on.p50_ms,
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


def _verdict(key: str, spread: dict[str, float], rounds: int) -> tuple[str, str]:
    """(target text, verdict) of a figure's spread over rounds: "met" only when its worst round
    clears the target (the largest for ≤, the smallest for ≥), "MISSED" when its median does not,
    otherwise "not shown" — some rounds clear it and some do not. One round has no spread to judge."""
    target = TARGETS.get(key)
    if target is None:
        return "none set", ""
    op, bound = target

    def clears(value: float) -> bool:
        return value <= bound if op == "<=" else value >= bound

    worst = spread["max"] if op == "<=" else spread["min"]
    if clears(worst):
        verdict = "met" if rounds > 1 else "met (1 round: no spread)"
    elif clears(spread["median"]):
        verdict = "not shown (spread straddles the target)"
    else:
        verdict = "MISSED"
    return f"{'≤' if op == '<=' else '≥'} {bound:g}", verdict


def _render(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _table(sections: list[str], summary: dict[str, dict[str, float]], rounds: int,
           batching_label: str = "adaptive, defaults", telemetry_label: str = json.dumps(TELEMETRY_CONFIG),
           ab_label: str = "") -> str:
    def med(key: str, fmt: str) -> str:
        return format(summary[key]["median"], fmt)

    def spread(key: str, fmt: str) -> str:
        s = summary[key]
        return f"{format(s['median'], fmt)} [{format(s['min'], fmt)}–{format(s['max'], fmt)}]" if rounds > 1 else format(s["median"], fmt)

    lines = []
    if "overhead" in sections:
        rows = [
            ("(a) CPU µs/request, 64 in flight", f"echo {med('echo_cpu_us', '.0f')}", f"{med('gateway_cpu_us', '.0f')}",
             f"×{spread('cpu_ratio', '.2f')}", "cpu_ratio"),
            ("    same ÷ Triton server (direct)", f"Triton {med('triton_cpu_us_direct', '.0f')}",
             f"{med('gateway_cpu_us', '.0f')}", f"×{spread('cpu_ratio_triton', '.2f')}", "cpu_ratio_triton"),
            ("    same ÷ Triton, side by side", f"Triton {med('pair_triton_cpu_us', '.0f')}",
             f"{med('pair_gateway_cpu_us', '.0f')}", f"×{spread('cpu_ratio_triton_paired', '.2f')}", "cpu_ratio_triton_paired"),
            ("    same, batching ON (info)", f"echo {med('echo_cpu_us', '.0f')}", f"{med('batchgw_cpu_us', '.0f')}",
             f"×{spread('cpu_ratio_batching_on', '.2f')}", "cpu_ratio_batching_on"),
            ("(b) requests/s, 64 in flight", f"direct {med('direct_rps', ',.0f')}", f"{med('gateway_rps', ',.0f')}",
             f"×{spread('rps_ratio', '.2f')}", "rps_ratio"),
            ("(c) p50 latency, concurrency 1", f"direct {med('direct_p50_ms', '.3f')} ms", f"{med('gateway_p50_ms', '.3f')} ms",
             f"{spread('added_p50_ms', '+.3f')} ms", "added_p50_ms"),
            ("    p99 latency, concurrency 1", f"direct {med('direct_p99_ms', '.3f')} ms", f"{med('gateway_p99_ms', '.3f')} ms",
             f"{spread('added_p99_ms', '+.3f')} ms", "added_p99_ms"),
        ]  # fmt: skip
        body = []
        for title, base, subject, ratio, key in rows:
            target, verdict = _verdict(key, summary[key], rounds)
            body.append((title, base, subject, ratio, target, verdict, NAIVE_PROXY.get(key, "")))
        lines.append(f"overhead — {MODEL}, gateway batching OFF (pass-through) unless noted")
        lines += _render(("measure", "baseline", "gateway", "ratio / added", "target", "", "naive proxy (measured)"), body)
        lines.append("")
        lines.append(
            f"side by side: direct Triton and the pass-through gateway in front of a second Triton, loaded at the same "
            f"time, each {f'paced at {PAIR_RATE:,.0f} req/s' if PAIR_RATE else 'as fast as answered'} over {HIGH_CONCURRENCY} workers (got "
            f"{med('pair_direct_rps', ',.0f')} and {med('pair_gateway_rps', ',.0f')} req/s)"
        )  # fmt: skip
        lines.append(
            f"context (medians): Triton server CPU µs/request {med('triton_cpu_us_direct', '.0f')} direct, "
            f"{med('triton_cpu_us_via_gateway', '.0f')} via gateway (with Python stubs "
            f"{med('triton_all_cpu_us_direct', '.0f')}, {med('triton_all_cpu_us_via_gateway', '.0f')}); "
            f"load-generator CPU µs/request {med('client_cpu_us_direct', '.0f')} direct, "
            f"{med('client_cpu_us_via_gateway', '.0f')} via gateway; echo {med('echo_rps', ',.0f')} req/s; "
            f"p50 at 64 in flight {med('direct_p50_ms_c64', '.2f')} ms direct, {med('gateway_p50_ms_c64', '.2f')} ms via gateway; "
            f"batching gateway {med('batchgw_rps', ',.0f')} req/s (Triton mean batch {med('batchgw_mean_batch', '.1f')})"
        )  # fmt: skip
    if "batching" in sections:
        if lines:
            lines.append("")
        body = []
        for case, (model, dynbatch) in BATCHING_CASES.items():
            for baseline, suffix in ((model, "direct"), (dynbatch, "dynbatch")):
                key = f"{case}_vs_{suffix}"
                target, verdict = _verdict(key, summary[key], rounds)
                body.append((
                    f"(d) {model} via gateway ÷ direct {baseline}",
                    f"{med(f'{case}_{suffix}_rps', ',.0f')} req/s (batch {med(f'{case}_batch_{suffix}', '.1f')})",
                    f"{med(f'{case}_gateway_rps', ',.0f')} req/s (batch {med(f'{case}_batch_gateway', '.1f')})",
                    f"×{spread(key, '.2f')}", target, verdict,
                    f"{med(f'{case}_gateway_cpu_us', '.0f')}",
                ))  # fmt: skip
        lines.append(f"batching — gateway batching ON ({batching_label}), {ROWS}×{COLS} FP32, {HIGH_CONCURRENCY} in flight; "
                     "batch = Triton's mean executed batch size (ΔModelStatistics)")  # fmt: skip
        lines += _render(("measure", "baseline (direct Triton)", "via batching gateway", "rps ratio", "target", "",
                          "gateway CPU µs/req"), body)  # fmt: skip
        lines.append("")
        for case, (model, dynbatch) in BATCHING_CASES.items():
            lines.append(
                f"context {model} (medians): p50 {med(f'{case}_p50_ms_direct', '.2f')} ms direct, "
                f"{med(f'{case}_p50_ms_dynbatch', '.2f')} ms {dynbatch}, {med(f'{case}_p50_ms_gateway', '.2f')} ms via gateway "
                f"(p99 {med(f'{case}_p99_ms_gateway', '.2f')}); Triton+stubs CPU µs/request "
                f"{med(f'{case}_triton_all_cpu_us_direct', '.0f')} direct, {med(f'{case}_triton_all_cpu_us_dynbatch', '.0f')} "
                f"{dynbatch}, {med(f'{case}_triton_all_cpu_us_gateway', '.0f')} via gateway; load-generator CPU µs/request "
                f"{med(f'{case}_client_cpu_us_direct', '.0f')} direct, {med(f'{case}_client_cpu_us_gateway', '.0f')} via gateway"
            )  # fmt: skip
    def on_off(prefix: str, mark: str, off: str = "", on: str = "") -> list[str]:
        """The rows of a feature's on ÷ off comparison (see _on_off_figures), with the CPU µs the
        feature adds per request beside the ratio."""
        off, on = off or f"{prefix} off", on or f"{prefix} on"
        body = []
        for title, base, subject, key, added in (
            (f"({mark}) gateway CPU µs/request, {on} ÷ {off}", f"{med(f'{prefix}_off_cpu_us', '.0f')} µs",
             f"{med(f'{prefix}_on_cpu_us', '.0f')} µs", f"{prefix}_cpu_ratio", f"{spread(f'{prefix}_added_cpu_us', '+.1f')} µs"),
            (f"    requests/s, {on} ÷ {off} (info)", f"{med(f'{prefix}_off_rps', ',.0f')} req/s",
             f"{med(f'{prefix}_on_rps', ',.0f')} req/s", f"{prefix}_rps_ratio", ""),
        ):  # fmt: skip
            target, verdict = _verdict(key, summary[key], rounds)
            body.append((title, base, subject, f"×{spread(key, '.3f')}", added, target, verdict))
        return _render(("measure", off, on, "ratio", "added per request", "target", ""), body)

    if "drift" in sections:
        if lines:
            lines.append("")
        lines.append(f"drift — {MODEL}, two gateways side by side with the default batching config, each paced at "
                     f"{DRIFT_RATE or 'max'} req/s over {DRIFT_CONCURRENCY} workers, at the same time, one adding drift: "
                     f"{json.dumps(DRIFT_CONFIG)} (drift defaults)")  # fmt: skip
        lines += on_off("drift", "e")
        lines.append("")
        lines.append(f"context (medians): p50 {med('drift_off_p50_ms', '.2f')} ms off, {med('drift_on_p50_ms', '.2f')} ms on")
    if "telemetry" in sections:
        if lines:
            lines.append("")
        lines.append(f"telemetry — {MODEL}, two gateways side by side with the default batching config, "
                     f"each paced at {TELEMETRY_RATE or 'max'} req/s over {TELEMETRY_CONCURRENCY} workers, at the same time, "
                     f"one adding telemetry: {telemetry_label} (a Prometheus endpoint is scraped every {SCRAPE_S:g} s; "
                     f"runs of ≥ {TELEMETRY_SECONDS:g} s)")  # fmt: skip
        lines += on_off("telemetry", "f")
        lines.append("")
        lines.append(f"context (medians): p50 {med('telemetry_off_p50_ms', '.2f')} ms off, "
                     f"{med('telemetry_on_p50_ms', '.2f')} ms on")
    if "ab" in sections:
        if lines:
            lines.append("")
        lines.append(f"ab — {MODEL}, two pass-through gateways side by side, each paced at {AB_RATE or 'max'} req/s over "
                     f"{AB_CONCURRENCY} workers, at the same time; B's server section: {ab_label}")
        lines += on_off("ab", "g", "A", "B")
        lines.append("")
        lines.append(f"context (medians): p50 {med('ab_off_p50_ms', '.2f')} ms A, {med('ab_on_p50_ms', '.2f')} ms B")
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
    versions = {}
    for module in ("grpc", "numpy", "numba"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "?"
    return {"cpus": str(os.cpu_count()), "cpu_model": model, "python": interpreter.describe(),
            "grpcio": versions["grpc"], "numpy": versions["numpy"], "numba": versions["numba"],
            "platform": platform.platform()}  # fmt: skip


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per measurement")
    parser.add_argument("--only", choices=(*SECTIONS, "ab"),
                        help="run one section: overhead (a–c), batching (d), drift (e), telemetry (f), or ab (g, with "
                             "--ab); default all but ab")
    parser.add_argument("--ab", metavar="JSON", help="section ab: gateway B's `server:` section, e.g. "
                        "'{\"gc_freeze\": false, \"gc_threshold\": 700}'")
    parser.add_argument("--engine", choices=("envoy", "h2", "grpcio"), help="the gateways' server.engine (default: theirs, auto)")
    parser.add_argument("--server", metavar="JSON",
                        help="`server:` section of every gateway's config (default: none, the gateway's defaults), "
                             "e.g. '{\"envoy_threads\": 1}'; --engine sets its `engine` key")
    parser.add_argument("--rounds", type=int, help="rounds, alternating order (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (default 4, --quick 2)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each window (default 1, --quick 0.5)")
    parser.add_argument("--streams", type=int, help="gateway upstream.streams_per_backend (default: the gateway's)")
    parser.add_argument("--batching", metavar="JSON",
                        help="`batching:` section of the batching gateway's config (default: none, the gateway's "
                             "defaults), e.g. '{\"default\": {\"max_queue_delay_us\": 1000}}'")
    parser.add_argument("--telemetry", metavar="JSON",
                        help="`telemetry:` section of the telemetry gateway (default: TELEMETRY_CONFIG); "
                             "\"{otlp}\" stands for the OTLP receiver's address, e.g. '{\"otlp_endpoint\": \"{otlp}\"}'")
    parser.add_argument("--gateway-env", metavar="NAME=VALUE", action="append", default=[],
                        help="environment variable for the gateway processes only (repeatable), e.g. GRPC_EXPERIMENTS=…")
    parser.add_argument("--upstream-socket", action="store_true",
                        help="Triton's HTTP endpoint on a Unix socket, the gateways' upstream over it (a co-located Triton)")
    parser.add_argument("--json", metavar="OUT", help="write the figures and every raw result to OUT")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    sections = [args.only] if args.only else list(SECTIONS)
    if ("ab" in sections) != (args.ab is not None):
        parser.error("--ab JSON goes with --only ab, and --only ab needs --ab JSON")
    plan = _plan(sections)

    workdir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-"))
    triton = triton_b = stats = scraper = None
    procs: dict[str, subprocess.Popen] = {}
    gateway_configs: dict[str, dict] = {}
    try:
        triton = LocalTriton(default_model_repository(), name="bench-triton", log_dir=workdir,
                             http_unix_socket=workdir / "triton-http.sock" if args.upstream_socket else None).start()
        gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
        addresses = {"direct": triton.grpc_address, "pairdirect": triton.grpc_address}
        roles = {run.target for run in plan}
        if "pairgw" in roles:
            triton_b = LocalTriton(default_model_repository(), name="bench-triton-b", log_dir=workdir,
                                   http_unix_socket=workdir / "triton-b-http.sock" if args.upstream_socket else None).start()
        batching_on = json.loads(args.batching) if args.batching else None
        telemetry = None
        if "telgw" in roles:
            procs["otlp"] = _spawn([sys.executable, "-m", "gateway.bench.otlp_receiver"], workdir / "otlp.log",
                                   "otlp receiver on")  # fmt: skip
            otlp = (workdir / "otlp.log").read_text().split("otlp receiver on ", 1)[1].split()[0]
            metrics_port = find_free_port()
            chosen = json.loads(args.telemetry) if args.telemetry else TELEMETRY_CONFIG
            telemetry = {key: (value.format(otlp=otlp, metrics_port=metrics_port) if isinstance(value, str) else value)
                         for key, value in chosen.items()}  # fmt: skip
            if "prometheus_port" in telemetry:
                telemetry["prometheus_port"] = metrics_port
            scraper = _Scraper(f"http://127.0.0.1:{metrics_port}/metrics", SCRAPE_S)
        for role, batching, drift in (("gateway", {"default": {"enabled": False}}, None), ("batchgw", batching_on, None),
                                      ("driftgw", batching_on, DRIFT_CONFIG), ("telgw", batching_on, None),
                                      ("abgw", {"default": {"enabled": False}}, None),
                                      ("pairgw", {"default": {"enabled": False}}, None)):  # fmt: skip
            if role not in roles:
                continue
            port = find_free_port()
            backend = triton_b if role == "pairgw" else triton
            pool = {"backends": [backend.grpc_address]}
            if args.upstream_socket:
                pool["http_backends"] = [backend.http_address]
            config = {"listen": f"127.0.0.1:{port}", "pools": {"cpu": pool}}
            if args.streams:
                config["upstream"] = {"streams_per_backend": args.streams}
            server = json.loads(args.server) if args.server else {}
            if args.engine:
                server["engine"] = args.engine
            if role == "abgw":
                server = {**server, **json.loads(args.ab)}
            if server:
                config["server"] = server
            if batching is not None:
                config["batching"] = batching
            if drift is not None:
                config["drift"] = drift
            if role == "telgw":
                config["telemetry"] = telemetry
            gateway_configs[role] = config
            path = workdir / f"{role}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            # The drift gateway compiles (cold: ~10 s) or loads its Numba kernels before it serves.
            procs[role] = _spawn([sys.executable, "-m", "gateway", "serve", "--config", str(path)], workdir / f"{role}.log",
                                 "tensorgate serving on", gateway_env, timeout=180 if drift else 60)  # fmt: skip
            addresses[role] = f"127.0.0.1:{port}"
        if "echo" in roles:
            echo_port = find_free_port()
            procs["echo"] = _spawn([sys.executable, "-m", "gateway.bench.echo", "--port", str(echo_port)],
                                   workdir / "echo.log", "echo serving on")  # fmt: skip
            addresses["echo"] = f"127.0.0.1:{echo_port}"
        # A gateway on the envoy engine is a launcher (idle while it serves) and its Envoy child,
        # which runs the gateway's Python: the child's CPU is the gateway's.
        pids = {"triton": triton.pid, **{role: _serving_pid(proc) for role, proc in procs.items()}}
        triton_pids = _process_group(triton.pid)
        behind = {role: triton_pids for role in roles}
        behind["echo"] = []
        if triton_b is not None:
            behind["pairgw"] = _process_group(triton_b.pid)
        for role, model in sorted({(run.target, run.model) for run in plan}):
            _wait_serving(addresses[role], role, model)
        if "drift" in sections:
            for role in ("batchgw", "driftgw"):
                primed = run_load_in_subprocess(addresses[role], MODEL, concurrency=HIGH_CONCURRENCY,
                                                requests=DRIFT_PRIME_REQUESTS, warmup_seconds=0, rows=ROWS, cols=COLS)  # fmt: skip
                print(f"primed {role} with {primed.requests} requests ({primed.errors} errors)", flush=True)
            for line in (workdir / "driftgw.log").read_text(errors="replace").splitlines():
                if "drift" in line:
                    print(f"  driftgw log: {line.strip()}", flush=True)
        stats = TritonStats(triton.grpc_address)
        print(f"bench: {', '.join(sections)}; upstream to Triton over {'a Unix socket' if args.upstream_socket else 'TCP'}; "
              f"{ROWS}×{COLS} FP32, {rounds} round(s) × {seconds:g} s (+{warmup:g} s warm-up) "
              f"× {len(plan)} runs; pids {pids}, Triton group {triton_pids}; logs in {workdir}", flush=True)  # fmt: skip

        raw_rounds = []
        per_round = []
        for index in range(rounds):
            results, batch = _round(index, plan, addresses, pids, behind, stats, seconds, warmup)
            raw_rounds.append({label: {**asdict(result), "triton_mean_batch": batch[label]} for label, result in results.items()})
            per_round.append(_figures(sections, results, batch, pids, triton_pids))
        summary = _summarize(per_round)
    finally:
        if scraper is not None:
            scraper.stop()
            print(f"scraped the telemetry gateway's /metrics {scraper.scrapes} times ({scraper.failures} failed)")
        if stats is not None:
            stats.close()
        for proc in procs.values():
            _stop(proc)
        for server in (triton, triton_b):
            if server is not None:
                server.stop()

    machine = _machine()
    print()
    print(f"tensorgate gateway benchmark — {ROWS}×{COLS} FP32; {rounds} round(s) × {seconds:g} s; "
          f"median [min–max] of per-round figures; {machine['cpus']} CPUs ({machine['cpu_model']}), "
          f"{machine['python']}, grpcio {machine['grpcio']}, numpy {machine['numpy']}, numba {machine['numba']}")  # fmt: skip
    print(_table(sections, summary, rounds, f"batching: {args.batching}" if args.batching else "adaptive, defaults",
                 args.telemetry or json.dumps(TELEMETRY_CONFIG), args.ab or ""))
    if summary["errors"]["max"]:
        print("WARNING: requests failed during measurement (see the round lines above)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine,
            "settings": {"sections": sections, "rows": ROWS, "cols": COLS, "rounds": rounds, "seconds": seconds,
                         "warmup": warmup, "high_concurrency": HIGH_CONCURRENCY, "plan": [run.label for run in plan],
                         "gateway_configs": gateway_configs, "gateway_env": gateway_env},
            "targets": {k: (list(v) if v else None) for k, v in TARGETS.items()},
            "figures": {key: value["median"] for key, value in summary.items()},
            "verdicts": {key: _verdict(key, summary[key], rounds)[1] for key in TARGETS if key in summary},
            "spread": summary,
            "per_round": per_round,
            "raw": raw_rounds,
        }, indent=2))  # fmt: skip
        print(f"figures written to {args.json}")
    if "driftgw" in gateway_configs:
        failures = [line for line in (workdir / "driftgw.log").read_text(errors="replace").splitlines() if "failed" in line]
        print(f"drift gateway log: {len(failures)} 'failed' lines" + (f", first: {failures[0]}" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
