"""The serving process's garbage collector: what start-up built is frozen, young collections are rarer.

A serving process holds a large, long-lived object graph from its start (numpy, numba, protobuf
descriptors, grpc, the stages) and allocates a few dozen short-lived containers per request, nearly
all freed by reference counting. With CPython's defaults (a young collection every 700 net
container allocations, an older one every 10 of those, a full one when enough survived) the
collector keeps walking both: 2.8–4 % of the envoy engine's CPU samples (perf) at 64 requests in
flight (benchmarks/RESULTS.md, "The cyclic garbage collector"). `gc.freeze()` after start-up
moves what start-up built out of every later collection: ~1 % is left. A higher young threshold
(`server.gc_threshold`) takes the rest, at a price in memory: cyclic garbage (a refused request's
exception and traceback) waits longer, and under a fuzzer's error-heavy traffic the process grew
twice as much at 20,000 and kept growing, so the default stays CPython's 700.

Applied only where the gateway is the process (`tensorgate serve`, a worker, the Envoy process of
the envoy engine): a gateway embedded in another program (tests' GatewayThread) leaves that
program's collector alone.
"""

from __future__ import annotations

import gc

from gateway.server.config import ServerConfig

__all__ = ["apply", "describe"]


def apply(server: ServerConfig) -> None:
    """`server.gc_freeze`: freeze what exists now (after a collection, so no garbage is frozen);
    `server.gc_threshold`: the young generation's threshold (the older generations' are kept)."""
    if server.gc_freeze:
        gc.collect()
        gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(server.gc_threshold, older, oldest)


def describe() -> dict:
    """The collector's state for the snapshot: thresholds, objects frozen, collections so far."""
    return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count(),
            "collections": [generation["collections"] for generation in gc.get_stats()]}
