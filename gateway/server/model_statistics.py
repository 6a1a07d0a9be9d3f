"""ModelStatistics as the gateway answers it: its own view, completed by its backends' where available.

Per model version, `inference_count` and `inference_stats.success/fail` are the gateway's own
(requests it answered, end-to-end time at the gateway); `queue` is the time requests waited in the
gateway's batching queue plus the backends' own queue time; the stages only a backend can see —
compute_input, compute_infer, compute_output, execution_count, batch_stats — are summed over every
healthy backend that serves the version (batch_stats therefore shows the batches the gateway formed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from gateway.errors import GatewayError, InvalidArgument, NotFound
from gateway.pipeline.core import Pipeline
from gateway.pipeline.exchange import ModelEntry
from gateway.protocol import pb
from gateway.protocol import triton_messages as triton
from gateway.upstream.fleet import Fleet

@dataclass(frozen=True)
class GatewayCounts:
    """A model version's counts at one gateway process: what other workers add to the answer."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0
    queue_count: int = 0
    queue_ns: int = 0

    def __add__(self, other: "GatewayCounts") -> "GatewayCounts":
        return GatewayCounts(
            self.success_count + other.success_count, self.success_ns + other.success_ns,
            self.fail_count + other.fail_count, self.fail_ns + other.fail_ns,
            max(self.last_inference_ms, other.last_inference_ms),
            self.queue_count + other.queue_count, self.queue_ns + other.queue_ns,
        )


#: The other workers' counts by (model, version), or nothing: a single process has none.
PeerCounts = Callable[[], Awaitable[dict[tuple[str, str], GatewayCounts]]]

BACKEND_DURATIONS = ("queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


async def _backend_statistics(fleet: Fleet, name: str, version: str, timeout: float) -> list:
    backends = [b for b in fleet.backends() if b.healthy and b.serves(name, version)]

    async def one(backend):
        try:
            return await backend.call(
                "ModelStatistics",
                pb.ModelStatisticsRequest(name=name, version=version),
                pb.ModelStatisticsResponse,
                timeout,
            )
        except GatewayError:
            return None  # statistics are best effort: a slow backend leaves its part out

    responses = await asyncio.gather(*(one(b) for b in backends))
    return [stats for r in responses if r is not None for stats in r.model_stats]


async def _resolve(pipeline: Pipeline, fleet: Fleet, model: str, version: str) -> ModelEntry:
    """The model's entry; an unknown model or version is refused as Triton refuses it here
    (INVALID_ARGUMENT, not the NOT_FOUND of inference), with what the gateway serves after."""
    try:
        if not pipeline.routes(model):
            raise pipeline.catalog.not_found(model, version)
        return await pipeline.resolve(model, version)
    except NotFound as error:
        model_served = pipeline.routes(model) and (model, "") in fleet.known_models()
        wording = triton.STATISTICS_UNKNOWN_VERSION if version and model_served else triton.STATISTICS_UNKNOWN_MODEL
        raise InvalidArgument(f"{wording.format(model=model)} ({error.message})") from None


def _add_duration(target, source) -> None:
    target.count += source.count
    target.ns += source.ns


async def _entries_with_peers(pipeline: Pipeline, peers: dict) -> list[ModelEntry]:
    """This process's model entries, and those only other workers have served so far."""
    entries = {(e.name, e.version): e for e in pipeline.entries()}
    for name, version in peers:
        if (name, version) not in entries:
            try:
                entry = await pipeline.resolve(name, version)
            except GatewayError:
                continue  # gone from the fleet since: nothing to report of it
            entries[(entry.name, entry.version)] = entry
    return list(entries.values())


async def model_statistics(pipeline: Pipeline, fleet: Fleet, request, deadline: float | None,
                           peer_counts: PeerCounts | None = None):
    """The ModelStatisticsResponse to `request`; backends get until `deadline` (at most 2 s) to add
    theirs. `peer_counts`: the other workers' own counts, added to this process's (gateway/workers/)."""
    peers = await peer_counts() if peer_counts is not None else {}
    if request.name:
        entries = [await _resolve(pipeline, fleet, request.name, request.version)]
    else:
        found = await _entries_with_peers(pipeline, peers) if peers else pipeline.entries()
        entries = sorted({id(e): e for e in found}.values(), key=lambda e: (e.name, e.version))
    timeout = 2.0 if deadline is None else max(0.0, min(deadline - time.monotonic(), 2.0))
    response = pb.ModelStatisticsResponse()
    for entry in entries:
        stats = response.model_stats.add()
        _fill(stats, entry, await _backend_statistics(fleet, entry.name, entry.version, timeout))
        batching = pipeline.dispatcher.batch_counters(entry.name, entry.version)
        if batching is not None:
            stats.inference_stats.queue.count += batching.requests
            stats.inference_stats.queue.ns += int(batching.queue_delay_s_total * 1e9)
        others = peers.get((entry.name, entry.version))
        if others is not None:
            _add_peer(stats, others)
    return response


def _add_peer(stats, counts: GatewayCounts) -> None:
    stats.inference_count += counts.success_count
    stats.inference_stats.success.count += counts.success_count
    stats.inference_stats.success.ns += counts.success_ns
    stats.inference_stats.fail.count += counts.fail_count
    stats.inference_stats.fail.ns += counts.fail_ns
    stats.inference_stats.queue.count += counts.queue_count
    stats.inference_stats.queue.ns += counts.queue_ns
    stats.last_inference = max(stats.last_inference, counts.last_inference_ms)


def _fill(stats, entry: ModelEntry, backend_stats: list) -> None:
    own = entry.counters
    stats.name = entry.name
    stats.version = entry.version
    stats.last_inference = own.last_inference_ms
    stats.inference_count = own.success_count
    stats.inference_stats.success.count = own.success_count
    stats.inference_stats.success.ns = own.success_ns
    stats.inference_stats.fail.count = own.fail_count
    stats.inference_stats.fail.ns = own.fail_ns
    batches: dict[int, object] = {}
    for remote in backend_stats:
        stats.execution_count += remote.execution_count
        for duration in BACKEND_DURATIONS:
            _add_duration(getattr(stats.inference_stats, duration), getattr(remote.inference_stats, duration))
        for batch in remote.batch_stats:
            merged = batches.get(batch.batch_size)
            if merged is None:
                merged = stats.batch_stats.add(batch_size=batch.batch_size)
                batches[batch.batch_size] = merged
            merged.compute_input.count += batch.compute_input.count
            merged.compute_input.ns += batch.compute_input.ns
            merged.compute_infer.count += batch.compute_infer.count
            merged.compute_infer.ns += batch.compute_infer.ns
            merged.compute_output.count += batch.compute_output.count
            merged.compute_output.ns += batch.compute_output.ns
