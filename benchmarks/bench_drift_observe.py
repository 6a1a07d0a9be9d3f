"""The drift stage's cost per request in-process: `ModelMonitor.observe` of 1×16 and 64×16 FP32
requests, window evaluations included (one every 1,000 rows: defaults, window 5,000 in 5 sub-windows).

    python benchmarks/bench_drift_observe.py

Process CPU time, best of 5 passes over 2,000 requests, after the reference (5,000 rows) is learned.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from gateway.bench.measure import machine
from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.ext import drift as kernels
from gateway.protocol import pb


def request(rng, rows: int):
    message = pb.ModelInferRequest(model_name="simple_scale")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    message.raw_input_contents.append(rng.standard_normal((rows, 16)).astype(np.float32).tobytes())
    return message


def main() -> int:
    print(f"machine: {machine('numpy', 'numba')}")
    kernels.warm_up()
    rng = np.random.default_rng(0)
    for mode in ("threshold", "calibrated"):
        for rows in (1, 64):
            monitor = ModelMonitor("simple_scale", ModelDriftConfig(mode=mode, reference=ReferenceConfig(learn_rows=5000)),
                                   lambda alert: None, 1000)
            requests = [request(rng, rows) for _ in range(2000)]
            for message in requests[: 5000 // rows + 200]:
                monitor.observe(message, None)
            best = float("inf")
            for _ in range(5):
                started = time.process_time()
                for message in requests:
                    monitor.observe(message, None)
                best = min(best, (time.process_time() - started) / len(requests))
            print(f"{mode:<10} {rows:>2} x 16 FP32: {best * 1e6:6.2f} µs a request (window evaluations included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
