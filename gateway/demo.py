"""`tensorgate demo`: two local Triton servers as two pools, the gateway in front, traffic through it.

What it shows, on any machine with the `local` extra installed and no GPU needed:
  1. routing — a model mix spread over pool `primary`, with `standby` as the spill-over pool;
  2. failover — part-way through, the primary Triton is SIGKILLed: traffic moves to the standby
     pool without failed requests, and when the primary returns it takes traffic again;
  3. drift — simple_scale's input feature 3 shifts by 1σ and the drift alert fires: the shift
     starts once the drift reference is learned, and traffic goes on past the planned time, for
     at most OVERTIME_S more, until the alert has fired (a slow, busy machine drives fewer rows)
     and the primary is back (a slow machine restarts Triton slowly);
  4. a readable summary: requests, errors, latency percentiles per model, who served what.

The gateway is served the way `tensorgate serve` serves it: on the engine its config resolves to
(`server.engine`; auto = h2 where its extension is built, the gateway's stages in this process;
with envoy they run inside the Envoy process). So the demo sees the gateway only as its users do: the admin API
(`tensorgate.admin.v1.GatewayService/GetSnapshot` for backends, health, routing and batching;
`DriftService` GetDriftReport and ListAlerts for the drift reference and alerts), the Prometheus
endpoint, and the capture folder on disk (`drift.capture_dir`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway.admin.drift_service import SERVICE as DRIFT_SERVICE
from gateway.admin.drift_service import messages as drift_messages
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import Snapshot, SnapshotRequest
from gateway.app import serving_gateway
from gateway.config import config_from_mapping
from gateway.local.triton import LocalTriton, default_model_repository, find_free_port
from gateway.protocol import pb

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
DRIFT_MODEL = "simple_scale"
DRIFTED_TENSOR = "input/INPUT0"
DRIFTED_FEATURE = 3
DRIFT_AT = 0.55  # share of the run after which simple_scale's inputs drift
#: simple_scale's drift monitor, sized to the demo's traffic: a busy 2-core machine drove ~120
#: simple_scale requests a second (~1,800 in 15 s, 2.5 rows each), which learns this reference in
#: ~3 s and turns a window over in ~2 s; a fully shifted window scores PSI ~1 against 0.25 to alert.
DRIFT_LEARN_ROWS = 1000
DRIFT_WINDOW_ROWS = 500
#: After the planned time, traffic goes on until the drift alert has fired and the restarted primary
#: is back in rotation, for at most this long.
OVERTIME_S = 30.0
#: Admin calls are small, but on a busy machine they wait their turn with the traffic.
ADMIN_TIMEOUT_S = 10.0
#: After the traffic stops, how long the capture worker (in the gateway) gets to finish writing.
CAPTURE_WAIT_S = 15.0
ENGINE_WORDS = {
    "envoy": "Envoy's HTTP/2 through pyvoy, the gateway's stages inside the Envoy process",
    "h2": "HTTP/2 by libnghttp2 on this process's event loop, the gateway's stages beside it",
    "grpcio": "grpc.aio, the gateway's stages in this process",
}


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


class Admin:
    """The gateway's admin API over gRPC, as any operator reaches it, on either engine."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        m = drift_messages()
        self._m = m
        self._snapshot = channel.unary_unary(f"/{GATEWAY_SERVICE}/GetSnapshot",
                                             request_serializer=SnapshotRequest.SerializeToString,
                                             response_deserializer=Snapshot.FromString)
        self._report = channel.unary_unary(f"/{DRIFT_SERVICE}/GetDriftReport",
                                           request_serializer=m["DriftReportRequest"].SerializeToString,
                                           response_deserializer=m["DriftReport"].FromString)
        self._alerts = channel.unary_unary(f"/{DRIFT_SERVICE}/ListAlerts",
                                           request_serializer=m["ListAlertsRequest"].SerializeToString,
                                           response_deserializer=m["ListAlertsResponse"].FromString)

    async def snapshot(self) -> dict:
        """GetSnapshot: backends (pool, health, served, failed), routing decisions, batching per model."""
        answer = await self._snapshot(SnapshotRequest(), timeout=ADMIN_TIMEOUT_S)
        return json.loads(answer.json)

    async def reference_learned(self, model: str, tensor: str) -> bool:
        """Whether the model's drift monitor has its reference of `tensor`: GetDriftReport's
        histograms carry a tensor once its reference is set (learned, loaded or from a profile)."""
        report = await self._report(self._m["DriftReportRequest"](model=model), timeout=ADMIN_TIMEOUT_S)
        return tensor in json.loads(report.histograms_json or "{}")

    async def alerts(self, model: str) -> list:
        """ListAlerts: the model's drift alerts so far (raised and cleared), oldest first."""
        answer = await self._alerts(self._m["ListAlertsRequest"](model=model), timeout=ADMIN_TIMEOUT_S)
        return list(answer.alerts)


def _captures(capture_dir: str, model: str) -> list[str]:
    """The capture folders of `model` written completely (report.json, and sample.npz whose zip
    directory, written last, is there): the retraining evidence of each raised drift alert."""
    folder = os.path.join(capture_dir, model)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    done = []
    for name in names:
        path = os.path.join(folder, name)
        sample = os.path.join(path, "sample.npz")
        if os.path.isfile(os.path.join(path, "report.json")) and os.path.isfile(sample) and zipfile.is_zipfile(sample):
            done.append(path)
    return done


def _summary(engine: str, snapshot: dict, tally: Tally, seconds: float, pools: dict[str, LocalTriton],
             timeline: list[str], logs: list[str]) -> str:
    """The run as the demo's client saw it (tally) and as the gateway's admin API reports it (snapshot)."""
    lines = ["", "tensorgate demo — summary", "=" * 72]
    lines.append(f"engine     {engine} ({ENGINE_WORDS[engine]})")
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
    lines.append(f"{'pool':<10}{'backend':<18}{'served':>10}{'failed':>8}  health   (admin GetSnapshot)")
    for address, backend in snapshot["backends"].items():
        lines.append(f"{backend['pool']:<10}{address:<18}{backend['served']:>10}{backend['failed']:>8}  {backend['health']}")
    decisions: collections.Counter = collections.Counter()
    for key, count in snapshot["routing"].items():  # "pool/reason"
        decisions[key.rpartition("/")[2]] += count
    lines.append(f"routing    {decisions['preferred']} to the preferred pool, {decisions['spill']} spilled to "
                 f"the next, {decisions['failover']} retried elsewhere after a failure")
    lines.append("")
    lines.append("batches the gateway formed (adaptive mode: sent at once while backends are free, "
                 "gathered while they are busy)")
    lines.append(f"{'model':<16}{'requests':>10}{'batches':>9}{'mean rows':>11}{'largest':>9}"
                 f"{'mean wait µs':>14}  why sent")
    for key, batching in snapshot["batching"].items():
        if not batching["batches"]:
            continue
        reasons = ", ".join(f"{why} {count}" for why, count in sorted(batching["reasons"].items()))
        largest = max(int(rows) for rows in batching["batch_sizes"])  # JSON: the sizes are string keys
        lines.append(f"{key.split(':')[0]:<16}{batching['requests']:>10}{batching['batches']:>9}"
                     f"{batching['mean_batch_rows']:>11.1f}{largest:>9}"
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
        lines.append("logs kept: " + ", ".join([*(str(t.log_path) for t in pools.values()), *logs]))
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


async def run_demo(seconds: float = 15.0, concurrency: int = 16, log_dir: str | None = None,
                   engine: str = "auto") -> int:
    """The demo; `engine` is the config's `server.engine` (auto: what the default config resolves to).
    Returns 0, or 1 when a request failed or the drift alert never fired."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="tensorgate-demo-")
    capture_dir = os.path.join(log_dir, "captures")
    metrics_port = find_free_port()
    repository = default_model_repository()
    pools = {
        "primary": LocalTriton(repository, name="primary", log_dir=log_dir),
        "standby": LocalTriton(repository, name="standby", log_dir=log_dir),
    }
    gateway = None
    logs: list[str] = []
    print("tensorgate demo: starting two local Triton servers from the nvidia-pytriton wheel ...")
    try:
        await asyncio.gather(*(asyncio.to_thread(t.start) for t in pools.values()))
        for name, triton in pools.items():
            print(f"  pool {name:<8} Triton on {triton.grpc_address}  (started in {triton.startup_seconds:.1f} s)")
        mapping = {
            "listen": "127.0.0.1:0",
            "server": {"engine": engine},
            "pools": {name: {"backends": [t.grpc_address]} for name, t in pools.items()},
            "health": {"interval_s": 0.25, "timeout_s": 1.0},
            "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
            # Watch simple_scale's input: a reference learned from its first rows, windows sized to the traffic.
            "drift": {
                "capture_dir": capture_dir,
                "models": {DRIFT_MODEL: {"window_rows": DRIFT_WINDOW_ROWS,
                                         "reference": {"learn_rows": DRIFT_LEARN_ROWS}}},
            },
        }
        config = config_from_mapping(mapping)
        resolved = config.server.resolved_engine()
        print(f"  starting the gateway on the {resolved} engine "
              f"({'server.engine: auto, ' if engine == 'auto' else ''}{ENGINE_WORDS[resolved]}) ...")
        began = time.monotonic()
        if resolved == "envoy":
            envoy_log = os.path.join(log_dir, "envoy.log")
            logs.append(envoy_log)
            with open(envoy_log, "ab") as stderr:  # Envoy keeps its own copy of the descriptor
                gateway = serving_gateway(config, mapping, envoy_stderr=stderr)
                await gateway.start()
            where = f"Envoy pid {gateway.engine.pid}, its log {envoy_log}"
        else:
            gateway = serving_gateway(config, mapping)
            await gateway.start()
            where = f"pid {os.getpid()}"
        print(f"  gateway  on {gateway.address}  (point tritonclient here; started in {time.monotonic() - began:.1f} s)")
        print(f"  engine   {resolved} ({where})")
        print(f"  metrics  http://127.0.0.1:{metrics_port}/metrics  (Prometheus scrape endpoint, OpenTelemetry)")
        print(f"  admin    tensorgate.admin.v1 GatewayService and DriftService on {gateway.address}; "
              f"drift captures in {capture_dir}")
        async with grpc.aio.insecure_channel(gateway.address) as admin_channel:
            return await _run(Admin(admin_channel), gateway.address, resolved, seconds, concurrency, pools,
                              metrics_port, capture_dir, logs)
    finally:
        if gateway is not None:
            await gateway.stop(grace=0)
        for triton in pools.values():
            triton.kill()
        # log_dir holds the Triton logs, Envoy's and the drift captures: kept for the user to look at.


@dataclass
class Watched:
    """What the demo knows of the gateway, as its admin API tells it; kept current by `_watch`."""

    primary: dict | None = None  # GetSnapshot: the primary backend (pool, health, detail, served, failed)
    reference_learned: bool = False  # GetDriftReport: simple_scale's reference of the drifted tensor is set
    alerts: list = field(default_factory=list)  # ListAlerts: simple_scale's DriftAlerts, oldest first
    failures: collections.Counter = field(default_factory=collections.Counter)  # admin calls that failed


async def _watch(admin: Admin, primary: str, watched: Watched) -> None:
    """Poll the admin API every 0.2 s, in a task of its own, so that an admin call kept waiting on
    a busy machine never holds up the demo's timeline. A failed call is asked again next turn."""
    while True:
        try:
            watched.primary = (await admin.snapshot())["backends"][primary]
            if not watched.reference_learned:
                watched.reference_learned = await admin.reference_learned(DRIFT_MODEL, DRIFTED_TENSOR)
            watched.alerts = await admin.alerts(DRIFT_MODEL)
        except grpc.aio.AioRpcError as error:
            watched.failures[error.code().name] += 1
        await asyncio.sleep(0.2)


async def _run(admin: Admin, address: str, engine: str, seconds: float, concurrency: int,
               pools: dict[str, LocalTriton], metrics_port: int, capture_dir: str, logs: list[str]) -> int:
    print(f"\ndriving 4 models for {seconds:.0f} s, {concurrency} requests in flight; the primary Triton is "
          f"killed at {seconds * 0.25:.0f} s and restarted at {seconds * 0.45:.0f} s; at {seconds * DRIFT_AT:.0f} s "
          f"(once {DRIFT_LEARN_ROWS:,} rows of reference are learned) feature {DRIFTED_FEATURE} of simple_scale's "
          f"input drifts by 1σ, and traffic goes on until its drift alert fires and the primary is back (at most {OVERTIME_S:.0f} s more):")
    tally = Tally()
    timeline: list[str] = []
    traffic = Traffic()
    watched = Watched()
    started = time.monotonic()
    driver = asyncio.ensure_future(_drive(address, concurrency, tally, traffic))
    watcher = asyncio.ensure_future(_watch(admin, pools["primary"].grpc_address, watched))
    drift_started: float | None = None  # time.time() of the shift, as the gateway stamps its alerts
    shift_at = 0.0  # and when in the run
    fired = None  # the drift alert on the shifted feature (a DriftAlert)

    def mark(event: str) -> str:
        timeline.append(f"{time.monotonic() - started:5.1f} s, {tally.done:>6} requests: {event}")
        return event

    kill: asyncio.Future | None = None
    restart: asyncio.Future | None = None
    try:
        note = mark("routing to pool primary")
        restarted = up_noted = returned = learned_noted = waiting_noted = overtime_noted = False
        served_at_return: int | None = None  # the primary's served count when it was healthy again
        quiet: collections.Counter = collections.Counter()  # levels of other features' warnings and clearings
        alerts_seen = 0
        health = "healthy"  # the gateway checked every backend before it served
        while not driver.done() and not watcher.done():
            elapsed = time.monotonic() - started
            if kill is None and elapsed >= seconds * 0.25:
                # In a thread: kill() sends SIGKILL at once, then waits (up to 3 s) for the
                # server's Python stubs to go, which must not stall the demo's own client.
                kill = asyncio.ensure_future(asyncio.to_thread(pools["primary"].kill))
                note = mark("primary Triton SIGKILLed; requests spill to pool standby")
            if kill is not None and kill.done() and not restarted and elapsed >= seconds * 0.45:
                restart = asyncio.ensure_future(asyncio.to_thread(pools["primary"].restart))
                restarted = True
                note = mark("primary Triton restarting on the same port")
            if watched.primary is not None and watched.primary["health"] != health:
                health = watched.primary["health"]
                if health == "healthy":
                    if restart is not None and served_at_return is None:
                        served_at_return = watched.primary["served"]
                    note = mark("the gateway sees the primary healthy again; traffic returns to it")
                else:
                    detail = watched.primary["detail"]
                    note = mark(f"the gateway takes the primary out of rotation ({health}: "
                                f"{detail if len(detail) <= 100 else detail[:99] + '…'})")
            if served_at_return is not None and not returned and watched.primary["served"] > served_at_return:
                returned = True
                note = mark(f"the primary serves again ({watched.primary['served'] - served_at_return} requests "
                            "since its return, admin GetSnapshot)")
            if watched.reference_learned and not learned_noted:
                learned_noted = True
                note = mark(f"simple_scale's drift reference is learned ({DRIFT_LEARN_ROWS:,} rows)")
            if not traffic.drifting and elapsed >= seconds * DRIFT_AT:
                if watched.reference_learned:
                    traffic.drifting = True
                    drift_started, shift_at = time.time(), elapsed
                    note = mark(f"simple_scale's input feature {DRIFTED_FEATURE} shifts by 1σ")
                elif not waiting_noted:
                    waiting_noted = True
                    note = mark(f"simple_scale's drift reference ({DRIFT_LEARN_ROWS:,} rows) is still being "
                                "learned: the shift waits for it")
            if restart is not None and restart.done() and not up_noted:
                up_noted = True
                if restart.exception() is not None:
                    returned = True  # nothing to wait for: the summary says why
                    note = mark(f"primary Triton did not start again: {str(restart.exception())[:200]}")
                else:
                    note = mark(f"primary Triton up again (started in {pools['primary'].startup_seconds:.1f} s)")
            for alert in watched.alerts[alerts_seen:]:
                if alert.level != "alert" and (alert.tensor, alert.feature) != (DRIFTED_TENSOR, DRIFTED_FEATURE):
                    quiet[alert.level] += 1  # another feature's warning or its clearing: counted, not narrated
                    continue
                note = mark(f"drift {alert.level}: simple_scale {alert.tensor}[{alert.feature}] "
                            f"{alert.statistic} = {alert.value:.3f}")
                if (fired is None and drift_started is not None and alert.time >= drift_started
                        and alert.level == "alert" and alert.tensor == DRIFTED_TENSOR and alert.feature == DRIFTED_FEATURE):
                    fired = alert  # the shift's alert (the gateway stamps alerts with its clock: this machine's)
            alerts_seen = max(alerts_seen, len(watched.alerts))
            if elapsed >= seconds:
                if (fired is not None and returned) or elapsed >= seconds + OVERTIME_S:
                    break
                if not overtime_noted:
                    overtime_noted = True
                    waiting = [what for what, done in (("the drift alert fires", fired is not None),
                                                       ("the primary is back", returned)) if not done]
                    note = mark(f"planned time reached; traffic goes on until {' and '.join(waiting)} "
                                f"(at most {OVERTIME_S:.0f} s more)")
            _progress(tally, seconds, elapsed, note)
            await asyncio.sleep(0.2)
        if watcher.done():
            watcher.result()  # the watch stopped on an error that is not a failed call: say which
        traffic.stop = True
        watcher.cancel()
        await driver
        for process in (kill, restart):
            if process is not None:
                await process
        _progress(tally, seconds, seconds, note)
        ran = time.monotonic() - started
        # The gateway's own account of the run, while it still serves: live state, alerts, metrics.
        snapshot = await admin.snapshot()
        alerts = await admin.alerts(DRIFT_MODEL)
        if quiet:
            timeline.append(f"{'':>24}  and {quiet['warning']} drift warning(s) on other features of simple_scale, "
                            f"{quiet['ok']} cleared again (a 500-row window's noise; below the alert threshold)")
        print(_summary(engine, snapshot, tally, ran, pools, timeline, logs))
        print(await asyncio.to_thread(_from_metrics, metrics_port))
        # Every raised alert leaves its evidence in the capture folder; a worker writes it, so wait a little.
        raised = sum(1 for alert in alerts if alert.level != "ok")
        deadline = time.monotonic() + CAPTURE_WAIT_S
        captures = _captures(capture_dir, DRIFT_MODEL)
        while len(captures) < raised and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            captures = _captures(capture_dir, DRIFT_MODEL)
        if fired is not None:
            print(f"\ndrift alert fired: simple_scale {fired.tensor}[{fired.feature}] {fired.statistic} = "
                  f"{fired.value:.3f}, {fired.time - drift_started:.1f} s after the 1σ shift")
        else:
            print(f"\ndrift alert did NOT fire within {OVERTIME_S:.0f} s after the planned end "
                  + ("(the shift never started: the reference was not learned)" if drift_started is None else
                     f"(the shift started at {shift_at:.1f} s)"))
        print(f"drift: {len(alerts)} alert events (admin ListAlerts); retraining evidence "
              f"(report.json + sample.npz) in {len(captures)} capture folder(s)"
              + (f", the first: {captures[0]}" if captures else ""))
        if not returned:
            print(f"the primary Triton was not back in rotation within {OVERTIME_S:.0f} s after the planned end "
                  f"(its log: {pools['primary'].log_path})")
        if watched.failures:
            print("admin calls that failed and were asked again: "
                  + ", ".join(f"{what} × {count}" for what, count in watched.failures.most_common()))
    finally:
        traffic.stop = True
        driver.cancel()
        watcher.cancel()
        await asyncio.gather(*(p for p in (kill, restart) if p is not None), return_exceptions=True)
    return 0 if not tally.errors and fired is not None else 1
