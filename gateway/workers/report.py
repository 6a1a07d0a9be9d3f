"""What a worker ships to its parent: cumulative counters, live gauges, and the drift rows it sampled.

Everything cumulative (request series, routing decisions, batch sizes, ModelStatistics counts) is
sent whole, not as a delta: a report that is lost changes nothing, and the parent keeps only the
latest of each worker. Drift rows are the exception: they are sent once (the worker forgets them),
as `ModelMonitor.sample` joined them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from gateway.server.model_statistics import GatewayCounts
from gateway.telemetry.aggregates import SeriesSnapshot


@dataclass(frozen=True)
class BackendGauge:
    """A backend as one worker sees it now."""

    address: str
    pool: str
    healthy: bool
    outstanding: int
    health: str = ""
    detail: str = ""
    served: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchedGauge:
    """A batched model version at one worker: rows per batch so far ({rows: batches}), requests waiting now."""

    name: str
    version: str
    batch_sizes: dict[int, int]
    waiting: int


@dataclass
class WorkerReport:
    worker_id: int
    pid: int
    requests: list[SeriesSnapshot] = field(default_factory=list)
    backend_time: list[SeriesSnapshot] = field(default_factory=list)
    queue_time: list[SeriesSnapshot] = field(default_factory=list)
    routing: dict[tuple[str, str], int] = field(default_factory=dict)
    backends: list[BackendGauge] = field(default_factory=list)
    batching: list[BatchedGauge] = field(default_factory=list)
    counts: dict[tuple[str, str], GatewayCounts] = field(default_factory=dict)
    sequences: int = 0
    snapshot: dict = field(default_factory=dict)
    drift: dict[str, tuple[dict, int]] = field(default_factory=dict)
    """{model: (groups, requests sampled)} since the last report (ModelMonitor.sample's groups)."""
    final: bool = False
    """The worker's last report: it is stopping."""

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)


def decode(raw: bytes):
    """A report (or another message) from a worker of this parent. Pickle: both ends are this
    package, and the hub's socket is in a directory only this user can enter."""
    return pickle.loads(raw)
