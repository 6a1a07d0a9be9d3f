"""One inference request's trip through the gateway, as each stage fills it in.

The pipeline makes an Exchange when a request is admitted and hands it down: the batching stage
notes how long it queued and the size of the batch it rode, the direct dispatcher which backend
served it, why that backend was picked and how long the backend took. Observers (statistics,
drift, metrics, traces) read it once the request is done, so no stage needs a hook into another.

Times are `time.perf_counter_ns()` readings: cheap, monotonic, and turned into wall-clock time only
for the few requests that are traced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.pipeline.admission import Gate
from gateway.pipeline.counters import RequestCounters
from gateway.pipeline.layout import ValidatedLayouts
from gateway.protocol.tensors import ModelSignature

if TYPE_CHECKING:  # pragma: no cover
    from gateway.upstream.backend import Backend


@dataclass(eq=False)  # identity: an entry is a hashable key of per-model series on the hot path
class ModelEntry:
    """A routed model version as the hot path sees it: resolved once, then a dict lookup."""

    name: str
    version: str
    signature: ModelSignature
    counters: RequestCounters = field(default_factory=RequestCounters)
    layouts: ValidatedLayouts = field(init=False, repr=False)
    """The request layouts that passed validation against `signature` (pipeline/layout.py)."""
    gate: Gate | None = field(default=None, repr=False)
    """The model's admission gate (pipeline/admission.py), set when the pipeline resolves it."""

    def __post_init__(self) -> None:
        self.layouts = ValidatedLayouts(self.signature)


class Exchange:
    """What the gateway learned about one request on its way through.

    A batch sent upstream gets an Exchange of its own (`members` are the requests merged into it);
    what the dispatcher notes on it is copied to each member when the batch returns.
    """

    __slots__ = (
        "entry", "request", "started_ns", "elapsed_ns", "backend", "route", "queued_ns",
        "upstream_started_ns", "upstream_ns", "batch_rows", "trace", "members", "layout", "merged",
    )

    def __init__(self, entry: ModelEntry, request, started_ns: int, trace: object | None = None) -> None:
        self.entry = entry
        self.request = request
        self.started_ns = started_ns
        self.elapsed_ns = 0  # arrival → response or error; set just before observers run
        self.backend: Backend | None = None  # the backend that answered (or failed) last
        self.route: str | None = None  # why it was picked: preferred, spill or failover
        self.queued_ns = 0  # time waiting in a batch queue (0 when not batched)
        self.upstream_started_ns = 0
        self.upstream_ns = 0  # time the backend call took (the whole batch's call when batched)
        self.batch_rows = 0  # rows of the batch this request rode in (0 when sent alone)
        self.trace = trace  # the trace starter's handle (telemetry's RequestTrace), set only for sampled requests
        self.members: list[Exchange] = []
        self.layout: tuple | None = None  # the request's layout once validated (pipeline/layout.py), if it has one
        # Whether it rode in a batch merged with other requests (False: it went alone). A flag, not a
        # reference to the batch: the batch holds its members, and a cycle would leave every batch
        # to the cyclic garbage collector (+2 µs a request on the batching path, measured).
        self.merged = False

    def __repr__(self) -> str:
        backend = self.backend.address if self.backend is not None else None
        return (
            f"<Exchange {self.entry.name}:{self.entry.version} backend={backend} route={self.route} "
            f"queued={self.queued_ns / 1e3:.0f}us upstream={self.upstream_ns / 1e3:.0f}us rows={self.batch_rows}>"
        )

    def took_batch(self, batch: "Exchange") -> None:
        """Copy what the dispatcher learned about the batch this request rode in."""
        self.merged = True
        self.backend = batch.backend
        self.route = batch.route
        self.upstream_started_ns = batch.upstream_started_ns
        self.upstream_ns = batch.upstream_ns
        self.batch_rows = batch.batch_rows
