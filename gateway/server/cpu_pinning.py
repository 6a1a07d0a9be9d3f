"""`server.cpus`: the serving process, and every thread and process it starts, on chosen CPUs.

Why: on the envoy engine one request is handed between three threads of one process (Envoy's
worker, pyvoy's executor, pyvoy's event loop) about eight times. Each hand-over wakes a thread, and
a wake-up on another CPU costs an inter-processor interrupt and cold caches, which on a virtual
machine is dearer still. Kept on one CPU, the threads wake each other on their own run queue: a
gateway pinned to one of this VM's two CPUs spent 19 % less CPU a request at 800 req/s and ~10 %
less at full load (benchmarks/RESULTS.md, "Eighth session"). So the benefit is one CPU per serving
process: with `server.workers`, worker k gets `cpus[k % len(cpus)]` alone; a single process gets
the whole list (give it one CPU to have the benefit).

The affinity is set on every thread the process has when it starts serving (Python's, grpc's,
numba's) and is inherited by what it starts later: Envoy and its threads on the envoy engine,
grpc core's pollers on grpcio. The supervisor of several workers stays unpinned (it only relays).
"""

from __future__ import annotations

import os

from gateway.errors import ConfigError

__all__ = ["check", "cpus_for", "pin"]


def check(cpus: tuple[int, ...]) -> None:
    """ConfigError unless this process may run on every CPU of `server.cpus`."""
    available = os.sched_getaffinity(0)
    missing = [cpu for cpu in cpus if cpu not in available]
    if missing:
        which = f"CPU {missing[0]} is" if len(missing) == 1 else f"CPUs {', '.join(map(str, missing))} are"
        raise ConfigError("server.cpus", f"{which} not among those this process may run on "
                          f"({', '.join(map(str, sorted(available)))})")


def cpus_for(cpus: tuple[int, ...], worker_id: int | None) -> set[int]:
    """The CPUs one serving process runs on: worker k of several gets one; a single process all."""
    if worker_id is None:
        return set(cpus)
    return {cpus[worker_id % len(cpus)]}


def pin(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus` (its children and later threads inherit them).

    Listed again until a pass finds no thread it had not pinned: one that an unpinned thread started
    meanwhile would otherwise keep the old affinity."""
    pinned: set[int] = set()
    while True:
        threads = {int(entry) for entry in os.listdir("/proc/self/task")} - pinned
        if not threads:
            return
        for thread in threads:
            try:
                os.sched_setaffinity(thread, cpus)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
        pinned |= threads
