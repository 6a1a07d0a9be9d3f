"""`tensorgate demo`: two local Triton servers as two pools, the gateway in front, traffic through it.

What it shows, on any machine with the `local` extra installed and no GPU needed:
  1. routing — a model mix spread over pool `primary`, with `standby` as the spill-over pool;
  2. failover — part-way through, the primary Triton is SIGKILLed: traffic moves to the standby
     pool without failed requests, and when the primary returns it takes traffic again;
  3. drift — simple_scale's input feature 3 shifts by 1σ and the drift alert fires: the shift
     starts once the drift reference is learned, and traffic goes on past the planned time, for
     at most DRIFT_GRACE_S more, until the alert has fired (a slow, busy machine drives fewer rows);
  4. a readable summary: requests, errors, latency percentiles per model, who served what.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway.config import config_from_mapping
from gateway.local.triton import LocalTriton, default_model_repository, find_free_port
from gateway.protocol import pb
from gateway.app import Gateway

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
DRIFTED_FEATURE = 3
DRIFT_AT = 0.55  # share of the run after which simple_scale's inputs drift
#: simple_scale's drift monitor, sized to the demo's traffic: a busy 2-core machine drove ~120
#: simple_scale requests a second (~1,800 in 15 s, 2.5 rows each), which learns this reference in
#: ~3 s and turns a window over in ~2 s; a fully shifted window scores PSI ~1 against 0.25 to alert.
DRIFT_LEARN_ROWS = 1000
DRIFT_WINDOW_ROWS = 500
#: After the planned time, shifted traffic goes on until the drift alert fires, for at most this long.
DRIFT_GRACE_S = 30.0


def _request(model: str, rng: np.random.Generator, shift: float = 0.0) -> bytes:
    """A serialized ModelInferRequest for one of the example models, with random contents;
    `shift` moves feature 3 of simple_scale's input (the drift the demo injects)."""
    request = pb.ModelInferRequest(model_name=model)

    def add(name: str, array: np.ndarray, datatype: str) -> None:
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())

    rows = int(rng.integers(1, 5))
    if model in ("simple_scale", "mlp"):
        values = rng.standard_normal((rows, 16)).astype(np.float32)
        values[:, DRIFTED_FEATURE] += shift
        add("INPUT0", values, "FP32")
    elif model == "add_sub":
        add("INPUT0", rng.standard_normal((rows, 16)).astype(np.float32), "FP32")
        add("INPUT1", rng.standard_normal((rows, 16)).astype(np.float32), "FP32")
    elif model == "bytes_reverse":
        words = [f"request-{int(rng.integers(1e6))}".encode() for _ in range(rows)]
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[rows, 1])
        request.raw_input_contents.append(b"".join(len(w).to_bytes(4, "little") + w for w in words))
    return request.SerializeToString()


@dataclass
class Tally:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter = field(default_factory=collections.Counter)
    done: int = 0


def _progress(tally: Tally, seconds: float, elapsed: float, note: str) -> None:
    width = 24
    filled = min(width, int(width * elapsed / seconds))
    recent = [v for values in tally.latencies_ms.values() for v in values[-200:]]
    p50 = f"{np.percentile(recent, 50):6.2f} ms" if recent else "     - ms"
    line = (f"\r  [{'#' * filled}{'.' * (width - filled)}] {elapsed:4.1f} s {tally.done:>7} requests  "
            f"errors {sum(tally.errors.values()):>3}  p50 {p50}  {note[:48]:<48}")
    sys.stdout.write(line)
    sys.stdout.flush()


@dataclass
class Traffic:
    """What the driver's workers read before each request: set by the demo as the run goes."""

    drifting: bool = False  # simple_scale's inputs are shifted
    stop: bool = False


async def _drive(address: str, concurrency: int, tally: Tally, traffic: Traffic) -> None:
    """Closed-loop traffic of four models from `concurrency` workers until `traffic.stop`; while
    `traffic.drifting`, simple_scale's inputs are shifted."""
    models = ["simple_scale", "add_sub", "mlp", "bytes_reverse"]
    rng = np.random.default_rng(0)
    pool = 512  # distinct requests per model, so the drift monitor sees a distribution
    payloads = {m: [_request(m, rng) for _ in range(pool)] for m in models}
    drifted = [_request("simple_scale", rng, shift=1.0) for _ in range(pool)]
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(INFER_METHOD)

        async def worker(index: int) -> None:
            sent = index
            while not traffic.stop:
                sent += concurrency
                model = models[sent % len(models)]
                started = time.perf_counter()
                choices = drifted if model == "simple_scale" and traffic.drifting else payloads[model]
                try:
                    await infer(choices[(sent // len(models)) % pool], timeout=10)
                    tally.latencies_ms[model].append((time.perf_counter() - started) * 1000)
                except grpc.aio.AioRpcError as error:
                    tally.errors[f"{model}: {error.code().name} {error.details()[:60]}"] += 1
                tally.done += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


def _summary(gateway: Gateway, tally: Tally, seconds: float, pools: dict[str, LocalTriton], timeline: list[str]) -> str:
    lines = ["", "tensorgate demo — summary", "=" * 72]
    ok = sum(len(v) for v in tally.latencies_ms.values())
    failed = sum(tally.errors.values())
    lines.append(f"requests   {ok + failed} in {seconds:.1f} s ({(ok + failed) / seconds:,.0f} req/s), "
                 f"{ok} succeeded, {failed} failed")
    lines.append("")
    lines.append(f"{'model':<16}{'requests':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for model, values in sorted(tally.latencies_ms.items()):
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        lines.append(f"{model:<16}{len(values):>10}{p50:>10.2f}{p90:>10.2f}{p99:>10.2f}{max(values):>10.2f}")
    lines.append("")
    lines.append(f"{'pool':<10}{'backend':<18}{'served':>10}{'failed':>8}  health")
    for backend in gateway.fleet.backends():
        lines.append(f"{backend.pool:<10}{backend.address:<18}{backend.served:>10}{backend.failed:>8}  {backend.health.value}")
    decisions = gateway.router.decisions_by_reason()
    lines.append(f"routing    {decisions['preferred']} to the preferred pool, {decisions['spill']} spilled to "
                 f"the next, {decisions['failover']} retried elsewhere after a failure")
    lines.append("")
    lines.append("batches the gateway formed (adaptive mode: sent at once while backends are free, "
                 "gathered while they are busy)")
    lines.append(f"{'model':<16}{'requests':>10}{'batches':>9}{'mean rows':>11}{'largest':>9}"
                 f"{'mean wait µs':>14}  why sent")
    for key, batching in gateway.batching.snapshot().items():
        if not batching["batches"]:
            continue
        reasons = ", ".join(f"{why} {count}" for why, count in sorted(batching["reasons"].items()))
        lines.append(f"{key.split(':')[0]:<16}{batching['requests']:>10}{batching['batches']:>9}"
                     f"{batching['mean_batch_rows']:>11.1f}{max(batching['batch_sizes']):>9}"
                     f"{batching['mean_queue_delay_us']:>14.0f}  {reasons}")
    if tally.errors:
        lines.append("")
        lines.append("errors:")
        lines.extend(f"  {count:>5} × {what}" for what, count in tally.errors.most_common(5))
    lines.append("")
    lines.append("what happened:")
    lines.extend(f"  {event}" for event in timeline)
    if tally.errors:
        lines.append("")
        lines.append("Triton logs kept: " + ", ".join(str(t.log_path) for t in pools.values()))
    return "\n".join(lines)


def _bucket_quantile(cumulative: dict[float, float], q: float) -> str:
    """Upper bound of the bucket holding quantile q of a cumulative histogram ({le: count})."""
    ordered = sorted(cumulative.items())
    total = ordered[-1][1] if ordered else 0
    for bound, count in ordered:
        if total and count >= q * total:
            return "inf" if bound == float("inf") else f"{bound * 1e3:.2f}ms"
    return "-"


def _from_metrics(port: int) -> str:
    """The same run as the gateway's own metrics endpoint reports it (what Prometheus would scrape)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    requests: dict[str, float] = collections.Counter()
    errors: dict[str, float] = collections.Counter()
    histograms = {name: collections.defaultdict(collections.Counter) for name in ("request", "backend", "queue")}
    batch_rows: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # model -> [sum, count]
    decisions: dict[str, float] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model, name = sample.labels.get("model"), sample.name
            if name == "tensorgate_requests_total" and model:
                requests[model] += sample.value
            elif name == "tensorgate_errors_total" and model:
                errors[model] += sample.value
            elif name == "tensorgate_routing_decisions_total":
                decisions[f"{sample.labels['pool']}/{sample.labels['reason']}"] += sample.value
            elif name == "tensorgate_batch_size_sum" and model:
                batch_rows[model][0] += sample.value
            elif name == "tensorgate_batch_size_count" and model:
                batch_rows[model][1] += sample.value
            else:
                for key, metric in (("request", "tensorgate_request_duration_seconds_bucket"),
                                    ("backend", "tensorgate_backend_duration_seconds_bucket"),
                                    ("queue", "tensorgate_batching_queue_duration_seconds_bucket")):
                    if name == metric and model:
                        histograms[key][model][float(sample.labels["le"])] += sample.value
    lines = ["", f"from the gateway's metrics (http://127.0.0.1:{port}/metrics; quantiles are bucket upper bounds):",
             f"{'model':<16}{'requests':>10}{'errors':>8}{'p50 ≤':>11}{'p99 ≤':>11}{'backend p50':>13}"
             f"{'queue p50':>11}{'rows/batch':>12}"]
    for model in sorted(requests):
        rows, batches = batch_rows[model]
        lines.append(
            f"{model:<16}{int(requests[model]):>10}{int(errors[model]):>8}"
            f"{_bucket_quantile(histograms['request'][model], 0.5):>11}{_bucket_quantile(histograms['request'][model], 0.99):>11}"
            f"{_bucket_quantile(histograms['backend'][model], 0.5):>13}{_bucket_quantile(histograms['queue'][model], 0.5):>11}"
            f"{(f'{rows / batches:.1f}' if batches else '-'):>12}"
        )
    lines.append("routing decisions: " + ", ".join(f"{key} {int(count)}" for key, count in sorted(decisions.items())))
    return "\n".join(lines)


async def run_demo(seconds: float = 15.0, concurrency: int = 16, log_dir: str | None = None) -> int:
    log_dir = log_dir or tempfile.mkdtemp(prefix="tensorgate-demo-")
    print("tensorgate demo: starting two local Triton servers from the nvidia-pytriton wheel ...")
    repository = default_model_repository()
    pools = {
        "primary": LocalTriton(repository, name="primary", log_dir=log_dir),
        "standby": LocalTriton(repository, name="standby", log_dir=log_dir),
    }
    await asyncio.gather(*(asyncio.to_thread(t.start) for t in pools.values()))
    for name, triton in pools.items():
        print(f"  pool {name:<8} Triton on {triton.grpc_address}  (started in {triton.startup_seconds:.1f} s)")
    metrics_port = find_free_port()
    config = config_from_mapping({
        "listen": "127.0.0.1:0",
        "pools": {name: {"backends": [t.grpc_address]} for name, t in pools.items()},
        "health": {"interval_s": 0.25, "timeout_s": 1.0},
        "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
        # Watch simple_scale's input: a reference learned from its first rows, windows sized to the traffic.
        "drift": {
            "capture_dir": os.path.join(log_dir, "captures"),
            "models": {"simple_scale": {"window_rows": DRIFT_WINDOW_ROWS,
                                        "reference": {"learn_rows": DRIFT_LEARN_ROWS}}},
        },
    })
    gateway = await Gateway(config).start()
    print(f"  gateway  on {gateway.address}  (point tritonclient here)")
    print(f"  metrics  http://127.0.0.1:{metrics_port}/metrics  (Prometheus scrape endpoint, OpenTelemetry)")
    print(f"\ndriving 4 models for {seconds:.0f} s, {concurrency} requests in flight; the primary Triton is "
          f"killed at {seconds * 0.25:.0f} s and restarted at {seconds * 0.45:.0f} s; at {seconds * DRIFT_AT:.0f} s "
          f"(once {DRIFT_LEARN_ROWS:,} rows of reference are learned) feature {DRIFTED_FEATURE} of simple_scale's "
          f"input drifts by 1σ, and traffic goes on until its drift alert fires (at most {DRIFT_GRACE_S:.0f} s more):")
    tally = Tally()
    timeline: list[str] = []
    traffic = Traffic()
    started = time.monotonic()
    driver = asyncio.ensure_future(_drive(gateway.address, concurrency, tally, traffic))
    primary = gateway.fleet.pools["primary"][0]
    drift_monitor = gateway.drift.monitors["simple_scale"]
    drift_started: float | None = None
    fired: dict | None = None  # the drift alert on the shifted feature
    fired_at = 0.0

    def mark(event: str) -> str:
        timeline.append(f"{time.monotonic() - started:5.1f} s, {tally.done:>6} requests: {event}")
        return event

    try:
        note = mark("routing to pool primary")
        killed = restarted = back = waiting_noted = overtime_noted = False
        alerts_seen = 0
        restart: asyncio.Future | None = None
        while not driver.done():
            elapsed = time.monotonic() - started
            if not killed and elapsed >= seconds * 0.25:
                pools["primary"].kill()
                killed = True
                note = mark("primary Triton SIGKILLed; requests spill to pool standby")
            if killed and not restarted and elapsed >= seconds * 0.45:
                restart = asyncio.ensure_future(asyncio.to_thread(pools["primary"].restart))
                restarted = True
                note = mark("primary Triton restarting on the same port")
            if restart is not None and restart.done() and primary.healthy and not back:
                back = True
                note = mark("primary healthy again; traffic returns to it")
            if not traffic.drifting and elapsed >= seconds * DRIFT_AT:
                learned = drift_monitor.tensors and all(t.reference is not None for t in drift_monitor.tensors.values())
                if learned:
                    traffic.drifting = True
                    drift_started = elapsed
                    note = mark(f"simple_scale's input feature {DRIFTED_FEATURE} shifts by 1σ")
                elif not waiting_noted:
                    waiting_noted = True
                    note = mark(f"simple_scale's drift reference ({DRIFT_LEARN_ROWS:,} rows) is still being "
                                "learned: the shift waits for it")
            for alert in gateway.drift.alerts[alerts_seen:]:
                note = mark(f"drift {alert['level']}: simple_scale {alert['tensor']}[{alert['feature']}] "
                            f"{alert['statistic']} = {alert['value']:.3f}")
                if fired is None and alert["level"] == "alert" and alert["feature"] == DRIFTED_FEATURE:
                    fired, fired_at = alert, elapsed
            alerts_seen = len(gateway.drift.alerts)
            if elapsed >= seconds:
                if fired is not None or elapsed >= seconds + DRIFT_GRACE_S:
                    break
                if not overtime_noted:
                    overtime_noted = True
                    note = mark("no drift alert yet: the shifted traffic goes on until it fires "
                                f"(at most {DRIFT_GRACE_S:.0f} s more)")
            _progress(tally, seconds, elapsed, note)
            await asyncio.sleep(0.2)
        traffic.stop = True
        await driver
        if restart is not None:
            await restart
        _progress(tally, seconds, seconds, note)
        print(_summary(gateway, tally, time.monotonic() - started, pools, timeline))
        print(await asyncio.to_thread(_from_metrics, metrics_port))
        captures = gateway.drift.capture.written if gateway.drift.capture else []
        if fired is not None:
            print(f"\ndrift alert fired: simple_scale {fired['tensor']}[{fired['feature']}] {fired['statistic']} = "
                  f"{fired['value']:.3f}, {fired_at - drift_started:.1f} s after the 1σ shift")
        else:
            print(f"\ndrift alert did NOT fire within {DRIFT_GRACE_S:.0f} s after the planned end "
                  + ("(the shift never started: the reference was not learned)" if drift_started is None else
                     f"(the shift started at {drift_started:.1f} s)"))
        print(f"drift: {len(gateway.drift.alerts)} alert events; retraining evidence "
              f"(report.json + sample.npz) in {len(captures)} capture folder(s)"
              + (f", the first: {captures[0]}" if captures else ""))
    finally:
        driver.cancel()
        await gateway.stop(grace=0)
        for triton in pools.values():
            triton.kill()
    # The folder holds the Triton logs and the drift captures: kept for the user to look at.
    return 0 if not tally.errors and fired is not None else 1
