"""Calibrated drift alerts, measured in-process through ModelMonitor (no gateway): false alerts in
quiet windows and how many rows a shift of one feature in 16 takes to alert.

    python benchmarks/bench_drift_calibration.py [--windows 1000] [--references 2] [--seeds 10]

Quiet: `--references` independent references of 20,000 rows, each followed by `--windows` windows of
5,000 rows × 16 features (sub_windows 5: 5 evaluations a window), from the same N(0, 1). Reports the
alerts, and the share of evaluations whose smallest Holm-adjusted p-value is <= 0.1 and <= 0.01
(the alerts a 500× and a 50× larger budget would have raised). Shifts: after one quiet window,
feature 3 moves by 0.5σ or 0.25σ; the sub-windows (1,000 rows each) until the alert, over `--seeds`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from gateway.bench.measure import machine
from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.protocol import pb

FEATURES, WINDOW, SUB_WINDOWS, REFERENCE_ROWS = 16, 5000, 5, 20_000


def request(block: np.ndarray):
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="X", datatype="FP32", shape=list(block.shape))
    message.raw_input_contents.append(block.astype(np.float32).tobytes())
    return message


def monitor(fired: list, budget: float) -> ModelMonitor:
    config = ModelDriftConfig(mode="calibrated", false_alarms_per_windows=budget, window_rows=WINDOW,
                              sub_windows=SUB_WINDOWS, reference=ReferenceConfig(learn_rows=REFERENCE_ROWS))
    return ModelMonitor("m", config, fired.append, reservoir_rows=10)


def quiet(seed: int, windows: int, budget: float) -> tuple[int, np.ndarray]:
    fired: list[dict] = []
    watched = monitor(fired, budget)
    rng = np.random.default_rng(seed)
    watched.observe(request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    adjusted = []
    for _ in range(windows * SUB_WINDOWS):
        watched.observe(request(rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))), None)
        report = watched.last_report
        if report is not None and report["windows_evaluated"] > len(adjusted):
            p_values = [p for feature in report["features"] for p in feature["p_values"].values()]
            adjusted.append(min(p_values) * len(p_values))
    return len([a for a in fired if a["level"] != "ok"]), np.array(adjusted)


def delay(seed: int, shift: float, budget: float, limit: int = 40) -> int | None:
    fired: list[dict] = []
    watched = monitor(fired, budget)
    rng = np.random.default_rng(10_000 + seed)
    watched.observe(request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    for _ in range(SUB_WINDOWS):
        watched.observe(request(rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))), None)
    for sub_window in range(1, limit + 1):
        block = rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))
        block[:, 3] += shift
        watched.observe(request(block), None)
        if any(a["level"] != "ok" for a in fired):
            return sub_window
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=1000.0, help="false_alarms_per_windows")
    arguments = parser.parse_args(argv)
    print(f"machine: {machine('numpy', 'numba')}")
    print(f"budget: at most 1 false alert per {arguments.budget:g} windows of {WINDOW} rows x {FEATURES} features\n")
    for reference in range(arguments.references):
        started = time.perf_counter()
        alerts, adjusted = quiet(2026 + reference, arguments.windows, arguments.budget)
        print(f"quiet, reference {reference}: {alerts} alert(s) in {arguments.windows} windows "
              f"({len(adjusted)} evaluations); Holm-adjusted min p <= 0.1: {np.mean(adjusted <= 0.1):.4f}, "
              f"<= 0.01: {np.mean(adjusted <= 0.01):.4f}; smallest {adjusted.min():.3g} ({time.perf_counter() - started:.1f} s)")
    for shift in (0.5, 0.25):
        delays = [delay(seed, shift, arguments.budget) for seed in range(arguments.seeds)]
        print(f"shift {shift}σ of feature 3: sub-windows of 1,000 rows until the alert over {arguments.seeds} seeds: "
              f"{delays} (max {max(d or 10**9 for d in delays)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
