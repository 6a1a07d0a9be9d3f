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

from gateway.errors import GatewayError, InvalidArgument, NotFound
from gateway.pipeline.core import Pipeline
from gateway.pipeline.exchange import ModelEntry
from gateway.protocol import pb
from gateway.protocol import triton_messages as triton
from gateway.upstream.fleet import Fleet

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


async def model_statistics(pipeline: Pipeline, fleet: Fleet, request, deadline: float | None):
    """The ModelStatisticsResponse to `request`; backends get until `deadline` (at most 2 s) to add theirs."""
    if request.name:
        entries = [await _resolve(pipeline, fleet, request.name, request.version)]
    else:
        entries = sorted({id(e): e for e in pipeline.entries()}.values(), key=lambda e: (e.name, e.version))
    timeout = 2.0 if deadline is None else max(0.0, min(deadline - time.monotonic(), 2.0))
    response = pb.ModelStatisticsResponse()
    for entry in entries:
        stats = response.model_stats.add()
        _fill(stats, entry, await _backend_statistics(fleet, entry.name, entry.version, timeout))
        batching = pipeline.dispatcher.batch_counters(entry.name, entry.version)
        if batching is not None:
            stats.inference_stats.queue.count += batching.requests
            stats.inference_stats.queue.ns += int(batching.queue_delay_s_total * 1e9)
    return response


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
