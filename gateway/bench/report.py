"""What `tensorgate bench` writes: the table, the ratios of a comparison, CSV, JSON and the plot."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from typing import Sequence

from gateway.bench.harness import StepResult

__all__ = ["CSV_FIELDS", "comparison_table", "plot", "results_table", "write_csv", "write_json"]

CSV_FIELDS = [
    "target", "mode", "level", "requests", "seconds", "throughput", "rows_per_s", "p50_ms", "p90_ms", "p95_ms",
    "p99_ms", "mean_ms", "errors", "stable", "windows", "client_cpu_us_per_request", "client_core_share", "workers",
    "sent_per_s", "lag_p99_ms", "sent_total", "answered_total", "failed_total",
]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def results_table(results: Sequence[StepResult]) -> str:
    from gateway.bench.measure import table

    header = ["target", "load", "req/s", "rows/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors",
              "client CPU us/req", "stable"]
    rows = []
    for r in results:
        rows.append([
            r.target, r.label, f"{r.throughput:,.0f}", f"{r.rows_per_s:,.0f}", _ms(r.p50_ms), _ms(r.p90_ms),
            _ms(r.p95_ms), _ms(r.p99_ms), _errors(r.errors),
            "-" if math.isnan(r.client_cpu_us_per_request) else f"{r.client_cpu_us_per_request:.0f}",
            "yes" if r.stable else f"no ({r.windows} windows)",
        ])
    return table(header, rows)


def comparison_table(results: Sequence[StepResult], targets: Sequence[str]) -> str:
    """Each other target against the first, level by level: ratios of throughput and latencies."""
    from gateway.bench.measure import table

    base, others = targets[0], targets[1:]
    by_level: dict[tuple[str, float], dict[str, StepResult]] = defaultdict(dict)
    for r in results:
        by_level[(r.mode, r.level)][r.target] = r
    header = ["load", "target", "req/s ratio", "p50 ratio", "p99 ratio"]
    rows = []
    for (mode, level), got in by_level.items():
        if base not in got:
            continue
        for other in others:
            if other not in got:
                continue
            a, b = got[base], got[other]
            rows.append([a.label, other, _ratio(b.throughput, a.throughput), _ratio(b.p50_ms, a.p50_ms),
                         _ratio(b.p99_ms, a.p99_ms)])
    return f"ratios: each target / {base} (req/s above 1: more; latency above 1: slower)\n" + table(header, rows)


def _ratio(value: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"x{value / base:.2f}"


def write_csv(path: str, results: Sequence[StepResult]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {name: getattr(r, name) for name in CSV_FIELDS}
            row["errors"] = sum(r.errors.values())
            writer.writerow(row)


def write_json(path: str, results: Sequence[StepResult], context: dict) -> None:
    with open(path, "w") as file:
        # NaN (no successful request in a step) is not JSON: it is written as null.
        json.dump(_nan_to_none({**context, "steps": [r.to_dict() for r in results]}), file, indent=1,
                  allow_nan=False)
        file.write("\n")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def plot(path: str, results: Sequence[StepResult], title: str) -> None:
    """Latency percentiles (p50 solid, p90 dashed, p99 dotted) against throughput, one colour per
    target, each step's load level written at its p99 point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    targets = list(dict.fromkeys(r.target for r in results))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, target in enumerate(targets):
        for mode in ("concurrency", "rate"):
            points = sorted((r for r in results if r.target == target and r.mode == mode), key=lambda r: r.level)
            if not points:
                continue
            x = [r.throughput for r in points]
            for field, style in (("p50_ms", "-"), ("p90_ms", "--"), ("p99_ms", ":")):
                axes.plot(x, [getattr(r, field) for r in points], style, marker="o", markersize=3,
                          color=colours[index % len(colours)],
                          label=f"{target} {field[:3]}" + (" (open loop)" if mode == "rate" else ""))
            for r in points:  # which step each point is: the curves follow the load levels in order
                axes.annotate(r.label, (r.throughput, r.p99_ms), fontsize=6, xytext=(3, 3),
                              textcoords="offset points", color=colours[index % len(colours)])
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
