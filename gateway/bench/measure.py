"""Shared helpers of the micro-benchmarks in benchmarks/: interleaved best-of timing, units, tables."""

from __future__ import annotations

import os
import platform
import time
import timeit
from typing import Callable

from gateway.server import interpreter


def best_time(calls: dict[str, Callable[[], object]], rounds: int, round_s: float,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best seconds per call of each, over `rounds` rounds that take turns (so drift hits all alike)."""
    timers = {name: timeit.Timer(call, timer=clock) for name, call in calls.items()}
    loops = {}
    for name, timer in timers.items():
        number, elapsed = timer.autorange()
        loops[name] = max(1, int(number * round_s / max(elapsed, 1e-9)))
    best = {name: float("inf") for name in calls}
    names = list(calls)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            best[name] = min(best[name], timers[name].timeit(loops[name]) / loops[name])
    return best


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(*libraries: str) -> str:
    """One line: CPU, cores, load, Python and the versions of `libraries` (module names)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = ", ".join(f"{name} {__import__(name).__version__}" for name in libraries)
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, load {load:.1f}, {platform.system()} {platform.release()}; "
            f"{interpreter.describe()}" + (f", {versions}" if versions else ""))


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)
