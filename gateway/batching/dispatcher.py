"""The batching stage: a Dispatcher that queues batchable requests and sends them as batches.

It wraps the DirectDispatcher (routing + upstream): a batch is one request to it. Requests of
models that cannot be batched — max_batch_size 0, stateful, decoupled, batching off — go straight
through.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

from gateway.batching.config import BatchingConfig, BatchingPolicy
from gateway.batching.merge import batch_key, key_bytes, merge, split
from gateway.batching.queue import BatchQueue, Queued
from gateway.batching.counters import BatchCounters
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.pipeline.layout import MAX_LAYOUTS

#: Batch queues kept per model version before the idle ones are dropped, and the largest batch key
#: (parameters, names) a queue is made for: together they bound what queues hold (~1 MiB a model).
MAX_QUEUES = 64
MAX_KEY_BYTES = 16 * 1024
from gateway.protocol.tensors import raw_of_typed
from gateway.routing.dispatcher import DirectDispatcher
from gateway.routing.router import Router

log = logging.getLogger(__name__)


_UNSEEN = object()


class BatchedModel(NamedTuple):
    """A model version that batches, as readers outside the stage (metrics, snapshots) see it."""

    model: str
    version: str
    counters: BatchCounters
    waiting: int
    """Requests waiting in its queues now."""


class _ModelBatching:
    """Batching state of one model version: its policy, its queues (one per batch key), its counters."""

    def __init__(self, entry: ModelEntry, policy: BatchingPolicy, max_rows: int) -> None:
        self.entry = entry
        self.policy = policy
        self.max_rows = max_rows
        self.queues: dict[tuple, BatchQueue] = {}
        self.places: dict[tuple, tuple[BatchQueue, int]] = {}
        """Request layout (Exchange.layout) → (its queue, its rows), for requests without parameters."""
        self.counters = BatchCounters()

    def __repr__(self) -> str:
        return f"<ModelBatching {self.entry.name} v{self.entry.version} max_rows={self.max_rows} queues={len(self.queues)}>"


def to_raw(request) -> None:
    """Convert a request's typed contents to raw_input_contents in place (one request at a time, so
    a value out of range for its datatype fails this request alone, never its batch-mates)."""
    if request.raw_input_contents or not request.inputs:
        return
    raw = raw_of_typed(request)
    for tensor in request.inputs:
        tensor.ClearField("contents")
    request.raw_input_contents.extend(raw)


def _priority(request) -> int:
    value = request.parameters.get("priority")
    if value is None:
        return 0
    kind = value.WhichOneof("parameter_choice")
    return int(getattr(value, kind)) if kind in ("int64_param", "uint64_param") else 0


class BatchingDispatcher:
    def __init__(self, direct: DirectDispatcher, config: BatchingConfig, router: Router) -> None:
        self.direct = direct
        self.config = config
        self.router = router
        self._models: dict[tuple[str, str], _ModelBatching | None] = {}
        self._by_entry: dict[ModelEntry, _ModelBatching | None] = {}
        self.batch_observers: list = []  # Pipeline.attach(batch_observer=): told of every batch answered

    def __repr__(self) -> str:
        active = [m for m in self._models.values() if m is not None]
        return f"<BatchingDispatcher models={len(active)} queues={sum(len(m.queues) for m in active)}>"

    def _batching_of(self, entry: ModelEntry) -> _ModelBatching | None:
        key = (entry.name, entry.version)
        if key in self._models:
            return self._models[key]
        signature = entry.signature
        policy = self.config.policy_for(entry.name)
        batchable = policy.enabled and signature.max_batch_size > 0 and not signature.sequence and not signature.decoupled
        state = None
        if batchable:
            max_rows = min(policy.max_batch_size or signature.max_batch_size, signature.max_batch_size)
            state = _ModelBatching(entry, policy, max_rows)
        self._models[key] = state
        return state

    def infer(self, exchange: Exchange, deadline: float | None):
        """An awaitable of the exchange's response: its batch queue's future, or the direct
        dispatcher's call for a model that does not batch. A plain function, not a coroutine: it
        never waits itself, so it adds no coroutine layer; what it raises, it raises at the call."""
        entry = exchange.entry
        batching = self._by_entry.get(entry, _UNSEEN)
        if batching is _UNSEEN:
            batching = self._by_entry[entry] = self._batching_of(entry)
        if batching is None:
            return self.direct.infer(exchange, deadline)
        request = exchange.request
        layout = exchange.layout
        if layout is not None and not request.parameters:
            # Raw contents, no parameters: the batch key and rows are functions of the layout.
            place = batching.places.get(layout)
            if place is None:
                place = self._place(batching, request, layout)
            queue, rows = place
            return queue.put(exchange, rows, deadline, 0)
        key = batch_key(request)
        if key_bytes(key) > MAX_KEY_BYTES:
            # A request unlike any other (kilobytes of parameters or names) gets no queue of its own to
            # keep: it goes as it came, and a client cannot make the gateway hold its keys.
            return self.direct.infer(exchange, deadline)
        to_raw(request)
        queue = self._queue(batching, key)
        rows = request.inputs[0].shape[0] if request.inputs else 1
        return queue.put(exchange, rows, deadline, _priority(request))

    def _place(self, batching: _ModelBatching, request, layout: tuple) -> tuple[BatchQueue, int]:
        place = (self._queue(batching, batch_key(request)), request.inputs[0].shape[0] if request.inputs else 1)
        if len(batching.places) >= MAX_LAYOUTS:
            batching.places.clear()
        batching.places[layout] = place
        return place

    def _queue(self, batching: _ModelBatching, key: tuple) -> BatchQueue:
        queue = batching.queues.get(key)
        if queue is None:
            if len(batching.queues) >= MAX_QUEUES:
                self._drop_idle_queues(batching)
            queue = self._new_queue(batching)
            batching.queues[key] = queue
        return queue

    @staticmethod
    def _drop_idle_queues(batching: _ModelBatching) -> None:
        """Forget the queues with nothing waiting or in flight: every batch key (inputs, shapes,
        parameters) makes a queue, and clients choose the keys — a fuzzer made 40 a second, each
        kept forever. Busy queues stay; an idle one is made again when its key comes back."""
        for key, queue in list(batching.queues.items()):
            if queue.idle:
                queue.retire()
                del batching.queues[key]
        batching.places.clear()  # it may point at dropped queues

    def infer_decoupled(self, exchange: Exchange, deadline: float | None):
        return self.direct.infer_decoupled(exchange, deadline)

    def _new_queue(self, batching: _ModelBatching) -> BatchQueue:
        entry = batching.entry
        per_backend = batching.policy.inflight_batches_per_backend

        def capacity() -> int:
            return max(1, self.router.healthy_count(entry.name, entry.version)) * per_backend

        limit_per_backend = batching.policy.inflight_limit_per_backend()

        def inflight_limit() -> int:
            return max(1, self.router.healthy_count(entry.name, entry.version)) * limit_per_backend

        async def send(batch: list[Queued]) -> None:
            for pending in batch:
                pending.item.queued_ns = int(pending.waited_s * 1e9)
            if len(batch) == 1:  # nothing to merge: the request goes as it came
                only = batch[0]
                only.item.batch_rows = only.rows
                response = await self.direct.infer(only.item, only.deadline)
                if not only.future.done():
                    only.future.set_result(response)
                return
            rows, members, requests = [], [], []
            earliest = trace = None  # the batch's deadline: its members' earliest; its first member trace
            for pending in batch:
                member = pending.item
                rows.append(pending.rows)
                members.append(member)
                requests.append(member.request)
                if pending.deadline is not None and (earliest is None or pending.deadline < earliest):
                    earliest = pending.deadline
                if trace is None:
                    trace = member.trace
            merged = Exchange(entry, merge(requests, rows), time.perf_counter_ns(), trace)
            merged.members = members
            merged.batch_rows = sum(rows)
            try:
                response = await self.direct.infer(merged, earliest)
            finally:
                for member in members:
                    member.took_batch(merged)
            singles = split(response, rows, merged.backend.address)
            for observe in self.batch_observers:
                observe(merged, response)
            for pending, single in zip(batch, singles):
                if not pending.future.done():
                    pending.future.set_result(single)

        return BatchQueue(entry.name, batching.policy, batching.max_rows, send, capacity, batching.counters,
                          inflight_limit=inflight_limit)

    def batch_counters(self, model: str, version: str) -> BatchCounters | None:
        batching = self._models.get((model, version))
        return batching.counters if batching is not None else None

    def batched_models(self) -> list[BatchedModel]:
        """Every model version that batches, with its counters and the requests waiting now.

        Safe to call from another thread (a metrics exporter): it copies the dicts it walks."""
        return [
            BatchedModel(name, version, batching.counters, sum(queue.size for queue in list(batching.queues.values())))
            for (name, version), batching in sorted(dict(self._models).items())
            if batching is not None
        ]

    def snapshot(self) -> dict[str, dict]:
        """Per model ('name:version'): batch sizes, queue delay, dispatch reasons, queues."""
        report = {}
        for name, version, counters, waiting in self.batched_models():
            batching = self._models[(name, version)]
            snapshot = counters.snapshot()
            snapshot["mode"] = batching.policy.mode
            snapshot["max_batch_rows"] = batching.max_rows
            snapshot["waiting"] = waiting
            snapshot["backend_latency_ms"] = max((q.backend_latency_s for q in batching.queues.values()), default=0) * 1e3
            report[f"{name}:{version}"] = snapshot
        return report

    async def close(self) -> None:
        for batching in self._models.values():
            if batching is not None:
                for queue in batching.queues.values():
                    await queue.close()
