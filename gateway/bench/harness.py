"""`tensorgate bench`: load sweeps against KServe v2 gRPC endpoints, perf_analyzer's way.

    harness = Harness(payloads, workers=2)
    results = harness.sweep(["127.0.0.1:8001", "127.0.0.1:9000"], [("concurrency", 1), ("concurrency", 64)],
                            Settings(window_s=2.0))
    harness.close()

Each step (one target, one load level) runs on every load process at once (gateway/bench/load.py;
the level is split between them), in measurement windows of `window_s`. Windows repeat until the
last three agree: each one's throughput and mean latency within `stability_percentage` of the
three's mean (perf_analyzer's rule), or until `max_trials` windows or `step_timeout_s` have passed
(the step is then marked unstable). The step's figures are those of the last three windows merged.
With several targets, steps are interleaved: level 1 on every target, then level 2, ... so drift in
the machine's load hits all targets alike.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from gateway.bench.load import Step, StepTotals, Window, worker_main

__all__ = ["Harness", "HarnessError", "Settings", "StepResult", "is_stable", "saturation_warnings", "stderr_progress"]

#: A load process using more than this share of one core is near saturation: its own queueing
#: then shows in the latencies it reports.
SATURATION_SHARE = 0.8
#: Open loop: a p99 send lag above this says the harness, not the target, is behind schedule.
LATE_SEND_MS = 5.0


class HarnessError(RuntimeError):
    """A load process failed, or a step could not run."""


@dataclass
class Settings:
    window_s: float = 2.0
    warmup_s: float = 0.5
    stability_percentage: float = 10.0
    max_trials: int = 10
    step_timeout_s: float = 60.0
    timeout_s: float = 30.0
    stream: bool = False
    streams: int = 1
    check_every: int = 64
    rows_per_request: int = 1
    seed: int = 0


@dataclass
class StepResult:
    target: str
    mode: str  # "concurrency" or "rate"
    level: float
    requests: int
    """Successful requests answered in the step's measured windows."""
    seconds: float
    throughput: float
    """Requests answered successfully per second."""
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    errors: dict[str, int]
    error_samples: list[str]
    stable: bool
    windows: int
    client_cpu_us_per_request: float
    client_core_share: float
    """The busiest load process's CPU seconds per second of window (1.0: a whole core)."""
    workers: int
    sent_per_s: float
    """Requests sent per second in the measured windows (open loop: the achieved arrival rate)."""
    lag_p99_ms: float = float("nan")
    """Open loop: p99 of how late requests left after their scheduled time."""
    checked: int = 0
    sent_total: int = 0
    answered_total: int = 0
    """Every reply the target gave without an error status during the step (warm-up and the
    unmeasured tail included): what the target's own statistics count."""
    failed_total: int = 0
    window_throughputs: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"c={self.level:g}" if self.mode == "concurrency" else f"r={self.level:g}/s"

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return asdict(self)


def _merge(per_worker_windows: list[list[Window]]) -> dict:
    """Figures of several windows, each a list of the load processes' parts."""
    latencies = np.concatenate([np.frombuffer(w.latencies_ns, np.int64) for ws in per_worker_windows for w in ws]
                               or [np.empty(0, np.int64)]) / 1e6
    lags = np.concatenate([np.frombuffer(w.lags_ns, np.int64) for ws in per_worker_windows for w in ws]
                          or [np.empty(0, np.int64)]) / 1e6
    # Each window's length is the mean of its parts' (they run at the same time, on different processes).
    seconds = sum(float(np.mean([w.seconds for w in ws])) for ws in per_worker_windows)
    requests = int(latencies.size)
    errors: dict[str, int] = {}
    samples: list[str] = []
    for ws in per_worker_windows:
        for w in ws:
            for code, count in w.errors.items():
                errors[code] = errors.get(code, 0) + count
            samples += [s for s in w.error_samples if s not in samples]
    cpu = sum(w.cpu_seconds for ws in per_worker_windows for w in ws)
    share = max((w.cpu_seconds / w.seconds for ws in per_worker_windows for w in ws if w.seconds > 0), default=0.0)
    if requests:
        p50, p90, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 90, 95, 99]))
        mean = float(latencies.mean())
    else:
        p50 = p90 = p95 = p99 = mean = float("nan")
    return dict(
        requests=requests, seconds=seconds, throughput=requests / seconds if seconds > 0 else 0.0,
        p50_ms=p50, p90_ms=p90, p95_ms=p95, p99_ms=p99, mean_ms=mean, errors=errors, error_samples=samples[:5],
        client_cpu_us_per_request=cpu / requests * 1e6 if requests else float("nan"), client_core_share=share,
        sent_per_s=sum(w.sent for ws in per_worker_windows for w in ws) / seconds if seconds > 0 else 0.0,
        lag_p99_ms=float(np.percentile(lags, 99)) if lags.size else float("nan"),
        checked=sum(w.checked for ws in per_worker_windows for w in ws),
    )


def is_stable(throughputs: Sequence[float], latencies: Sequence[float], percentage: float) -> bool:
    """perf_analyzer's rule: the last three windows' throughput and mean latency each within
    `percentage` % of the three's mean."""
    if len(throughputs) < 3:
        return False
    for values in (throughputs[-3:], latencies[-3:]):
        values = np.asarray(values, dtype=float)
        if np.isnan(values).any():
            return False
        mean = values.mean()
        if mean == 0:
            continue  # all zero (nothing answered): as stable as it gets
        if np.max(np.abs(values - mean)) > mean * percentage / 100:
            return False
    return True


class Harness:
    """`workers` load processes, started once, each holding the payloads it sends."""

    def __init__(self, payloads: list[bytes], *, workers: int = 1, check_every: int = 64) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        context = multiprocessing.get_context("spawn")  # gRPC does not survive a fork
        self._processes = []
        self._conns = []
        for _ in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(child_end, payloads, check_every), daemon=True)
            process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)

    @property
    def workers(self) -> int:
        return len(self._processes)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _receive(self, index: int, deadline: float):
        conn = self._conns[index]
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not conn.poll(min(left, 1.0)):
                if not self._processes[index].is_alive():
                    raise HarnessError(f"load process {index} ended (exit code {self._processes[index].exitcode})")
                if left <= 0:
                    raise HarnessError(f"load process {index} sent nothing before its deadline")
                continue
            message = conn.recv()
            if message[0] == "error":
                raise HarnessError(f"load process {index} failed:\n{message[1]}")
            return message

    def run_step(self, target: str, mode: str, level: float, settings: Settings,
                 progress: Callable[[str], None] | None = None) -> StepResult:
        """One step on `target` (see the module's docstring)."""
        workers = self.workers
        if mode == "concurrency":
            shares = [int(level) // workers + (1 if i < int(level) % workers else 0) for i in range(workers)]
        else:
            shares = [level / workers] * workers
        active = [i for i, share in enumerate(shares) if share > 0]
        for i in active:
            self._conns[i].send(("step", Step(
                target=target, mode=mode, level=shares[i], window_s=settings.window_s, warmup_s=settings.warmup_s,
                timeout_s=settings.timeout_s, stream=settings.stream, streams=settings.streams,
                check_every=settings.check_every, seed=settings.seed * 1000 + i,
            )))
        started = time.monotonic()
        step_deadline = started + settings.step_timeout_s
        windows: list[list[Window]] = []
        throughputs: list[float] = []
        latencies: list[float] = []
        stable = False
        try:
            while True:
                wait_until = time.monotonic() + settings.warmup_s + settings.window_s * 2 + settings.timeout_s + 30
                parts = [self._receive(i, wait_until)[1] for i in active]
                windows.append(parts)
                figures = _merge([parts])
                throughputs.append(figures["throughput"])
                latencies.append(figures["mean_ms"] if figures["requests"] else 0.0)
                stable = is_stable(throughputs, latencies, settings.stability_percentage)
                if progress is not None:
                    errors = sum(figures["errors"].values())
                    progress(f"[{target} {mode} {level:g}] window {len(windows)}/{settings.max_trials}: "
                             f"{figures['throughput']:,.0f} req/s, p50 {figures['p50_ms']:.2f} ms, "
                             f"p99 {figures['p99_ms']:.2f} ms, {errors} errors"
                             + (", stable" if stable else ""))
                if (stable or len(windows) >= settings.max_trials
                        or time.monotonic() + settings.window_s > step_deadline):
                    break
        finally:
            for i in active:
                self._conns[i].send(("stop",))
        totals: list[StepTotals] = []
        for i in active:
            deadline = time.monotonic() + settings.timeout_s + 30
            while True:
                message = self._receive(i, deadline)
                if message[0] == "done":
                    totals.append(message[1])
                    break
        figures = _merge(windows[-3:])
        return StepResult(
            target=target, mode=mode, level=level, stable=stable, windows=len(windows), workers=len(active),
            rows_per_s=figures["throughput"] * settings.rows_per_request,
            sent_total=sum(t.sent for t in totals), answered_total=sum(t.answered for t in totals),
            failed_total=sum(t.failed for t in totals), window_throughputs=throughputs, **figures,
        )

    def sweep(self, targets: Sequence[str], levels: Sequence[tuple[str, float]], settings: Settings,
              progress: Callable[[str], None] | None = None) -> list[StepResult]:
        """Every level on every target, interleaved: level by level, the targets in turn."""
        results = []
        for mode, level in levels:
            for target in targets:
                results.append(self.run_step(target, mode, level, settings, progress))
        return results


def saturation_warnings(results: Sequence[StepResult]) -> list[str]:
    """What to tell the user about the harness's own load."""
    warnings = []
    for result in results:
        if result.client_core_share >= SATURATION_SHARE:
            warnings.append(
                f"{result.target} {result.label}: a load process used {result.client_core_share:.0%} of a core; "
                f"the harness is near saturation and its own queueing adds to the latencies: use more --workers"
                + (f" (this machine has {os.cpu_count()} CPUs)" if os.cpu_count() else ""))
        if result.mode == "rate" and result.level:
            # Poisson arrivals: the count in the measured windows varies by sqrt(count) by itself.
            expected = result.level * result.seconds
            slack = max(0.05, 3 / np.sqrt(expected)) if expected > 0 else 1.0
            if result.sent_per_s < result.level * (1 - slack):
                warnings.append(f"{result.target} {result.label}: sent only {result.sent_per_s:,.0f} req/s of the "
                                f"{result.level:,.0f} asked for: the harness could not keep the rate")
            if result.lag_p99_ms > LATE_SEND_MS:
                warnings.append(f"{result.target} {result.label}: 1 % of requests left more than "
                                f"{result.lag_p99_ms:.1f} ms after their scheduled time: the harness falls behind "
                                f"(the latencies, counted from the scheduled time, include that)")
        if not result.stable:
            warnings.append(f"{result.target} {result.label}: not stable after {result.windows} windows "
                            f"(throughput per window: {', '.join(f'{t:,.0f}' for t in result.window_throughputs)})")
    return warnings


def stderr_progress(line: str) -> None:
    """A live progress line: rewritten in place on a terminal, one line per window otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
