"""The router's cost per decision, in-process, with stand-in backends: a baseline router (a file
given on the command line, e.g. the previous commit's gateway/routing/router.py) beside this one.

    git show <base>:gateway/routing/router.py > /tmp/base_router.py
    .venv/bin/python benchmarks/bench_router.py /tmp/base_router.py

The baseline is timed on `choose` alone (it learns nothing); this router on `choose` + `observe`
(what the dispatcher calls per backend call). Best of 9 runs of 50,000 decisions each.
"""

import importlib.util
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.routing.config import ModelRoute  # noqa: E402
from gateway.routing.router import Router as NewRouter  # noqa: E402
from tests.test_routing_units import StandInBackend, StandInFleet  # noqa: E402

spec = importlib.util.spec_from_file_location("base_router", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)


def fleet():
    return StandInFleet(gpu=[StandInBackend(f"g{i}", "gpu") for i in range(2)], cpu=[StandInBackend(f"c{i}", "cpu") for i in range(2)])
routers = {
    "baseline: choose": (old.Router(fleet(), {"m": ModelRoute(pools=("gpu", "cpu"))}, rng=random.Random(1)), False),
    "placement, no objective: choose + observe": (NewRouter(fleet(), {"m": ModelRoute(pools=("gpu", "cpu"))}, rng=random.Random(1)), True),
    "placement, latency_slo_ms: choose + observe": (NewRouter(fleet(), {"m": ModelRoute(pools=("gpu", "cpu"), latency_slo_ms=100.0)}, rng=random.Random(1)), True),
}
n, best = 50000, {k: float("inf") for k in routers}
for _ in range(9):
    for name, (router, observe) in routers.items():
        if observe:
            def step(router=router):
                backend, _ = router.choose("m", "1")
                router.observe("m", "1", backend, 0.002, 1)
        else:
            def step(router=router):
                router.choose("m", "1")
        best[name] = min(best[name], timeit.timeit(step, number=n) / n * 1e6)
for name, us in best.items():
    print(f"{name}: {us:.2f} us")
