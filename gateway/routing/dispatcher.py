"""The direct dispatcher: pick a backend for a request (sticky for sequences), send it, retry once.

It implements the pipeline's `Dispatcher` contract (gateway/pipeline/contracts.py); the batching
stage wraps it and hands it whole batches as single requests.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Awaitable

from gateway.errors import DeadlineExceeded, Unavailable, shown
from gateway.pipeline.contracts import TracedSend
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.routing.mirror import Mirror
from gateway.routing.router import STICKY, Router
from gateway.routing.sequences import SequenceTable
from gateway.upstream.backend import Backend

#: How long an idle sequence stays bound when neither the config nor the model says.
DEFAULT_SEQUENCE_IDLE_S = 60.0
#: A probe copy's own deadline: a pool out for missing its objective may be very slow.
PROBE_TIMEOUT_S = 30.0


def sequence_of(request) -> tuple[object, bool, bool] | None:
    """(sequence id, start, end) of a stateful request, or None if it carries no sequence id."""
    parameters = request.parameters
    if "sequence_id" not in parameters:
        return None
    value = parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    sequence_id = value.string_param if kind == "string_param" else (
        value.int64_param if kind == "int64_param" else value.uint64_param
    )
    if not sequence_id:
        return None
    start = "sequence_start" in parameters and parameters["sequence_start"].bool_param
    end = "sequence_end" in parameters and parameters["sequence_end"].bool_param
    return sequence_id, start, end


class DirectDispatcher:
    """Routes each request to a backend and sends it there; retries once elsewhere on UNAVAILABLE.

    Notes on the exchange which backend served it, why it was picked, and how long the call took.
    A traced exchange goes through `traced_send` (gateway/telemetry/tracing.py), which carries the
    trace context to Triton.
    """

    def __init__(
        self, router: Router, sequences: SequenceTable, retry_unavailable: bool = True, clock=time.monotonic,
        probes: Mirror | None = None,
    ):
        self.router = router
        self.probes = probes or Mirror(4)  # copies measuring pools out for missing their objective
        self.sequences = sequences
        self.retry_unavailable = retry_unavailable
        self._clock = clock
        self.traced_send: TracedSend | None = None

    def __repr__(self) -> str:
        return f"<DirectDispatcher {self.sequences!r} retry_unavailable={self.retry_unavailable}>"

    def sequence_idle_s(self, entry: ModelEntry) -> float:
        """Seconds an idle sequence of the model stays bound: the config's routing
        `sequence_idle_timeout_s`, else the model's own max_sequence_idle_microseconds, else 60 s."""
        return (
            self.router.sequence_idle_timeout_s(entry.name)
            or entry.signature.sequence_idle_s
            or DEFAULT_SEQUENCE_IDLE_S
        )

    def _pick(self, entry: ModelEntry, request) -> tuple[Backend, str, tuple | None]:
        sequence = sequence_of(request) if entry.signature.sequence else None
        if sequence is None:
            return (*self.router.choose(entry.name, entry.version), None)
        sequence_id, start, _ = sequence
        backend = None if start else self.sequences.lookup(entry.name, sequence_id)
        if backend is not None and not backend.healthy:
            self.sequences.end(entry.name, sequence_id)
            raise Unavailable(
                f"sequence {shown(repr(sequence_id))} of model '{entry.name}' lived on a backend that is no longer "
                "healthy; its state is lost: start the sequence again", detail=f"backend {backend.address}")
        if backend is not None:
            return backend, STICKY, sequence
        # Not bound here (a start, or a sequence begun through another worker): rendezvous hashing
        # picks the backend every worker picks for it.
        backend, reason = self.router.choose_for_sequence(entry.name, entry.version, sequence_id)
        self.sequences.bind(entry.name, sequence_id, backend, self.sequence_idle_s(entry))
        return backend, reason, sequence

    def _set_timeout(self, request, deadline: float | None) -> None:
        # Triton takes a per-request timeout (µs) as the "timeout" parameter: the client's deadline,
        # carried across the stream, which has no per-message deadline of its own.
        if deadline is not None and "timeout" not in request.parameters:
            remaining_us = int((deadline - self._clock()) * 1e6)
            request.parameters["timeout"].int64_param = max(remaining_us, 1)

    def _send(self, backend: Backend, exchange: Exchange, deadline: float | None) -> Awaitable:
        """The backend call's awaitable (a plain function: no coroutine layer of its own)."""
        exchange.backend = backend
        if exchange.trace is not None and self.traced_send is not None:
            return self.traced_send(backend, exchange, deadline)
        return backend.infer(exchange.request)

    def _probe(self, entry: ModelEntry, request, sequence) -> None:
        """Send the copy the router asked for (a pool out for missing the objective, measured again)."""
        backend, self.router.probe = self.router.probe, None
        if sequence is not None:
            return  # a sequence's state lives on its backend: never copied
        model, version, observe = entry.name, entry.version, self.router.observe

        def measured(backend, ahead, elapsed_s, response, error) -> None:
            if error is None or isinstance(error, DeadlineExceeded):
                observe(model, version, backend, elapsed_s, ahead)

        self.probes.send(backend, request, PROBE_TIMEOUT_S, measured)

    async def infer(self, exchange: Exchange, deadline: float | None):
        entry, request = exchange.entry, exchange.request
        backend, exchange.route, sequence = self._pick(entry, request)
        if self.router.probe is not None:
            self._probe(entry, request, sequence)
        self._set_timeout(request, deadline)
        ahead = backend.outstanding
        exchange.upstream_started_ns = started = time.perf_counter_ns()
        try:
            response = await self._send(backend, exchange, deadline)
            self.router.observe(entry.name, entry.version, backend, (time.perf_counter_ns() - started) / 1e9, ahead)
            return response
        except DeadlineExceeded:  # slow is what a deadline measures: the router learns it too
            self.router.observe(entry.name, entry.version, backend, (time.perf_counter_ns() - started) / 1e9, ahead)
            raise
        except Unavailable:
            retry_allowed = (
                self.retry_unavailable
                and (sequence is None or sequence[1])
                and (deadline is None or deadline - self._clock() > 0.001)
            )
            if not retry_allowed:
                raise
            if sequence is None:
                retry_backend, exchange.route = self.router.choose(entry.name, entry.version, exclude=backend)
            else:  # a start that failed: the runner-up, as rendezvous ranks them
                retry_backend, exchange.route = self.router.choose_for_sequence(
                    entry.name, entry.version, sequence[0], exclude=backend)
            if sequence is not None:
                self.sequences.bind(entry.name, sequence[0], retry_backend, self.sequence_idle_s(entry))
            return await self._send(retry_backend, exchange, deadline)
        finally:
            exchange.upstream_ns = time.perf_counter_ns() - exchange.upstream_started_ns
            if sequence is not None and sequence[2]:
                self.sequences.end(entry.name, sequence[0])

    async def infer_decoupled(self, exchange: Exchange, deadline: float | None) -> AsyncIterator:
        entry, request = exchange.entry, exchange.request
        backend, exchange.route, sequence = self._pick(entry, request)
        self.router.probe = None  # a decoupled model's answers are a stream: not probed by copies
        exchange.backend = backend
        self._set_timeout(request, deadline)
        exchange.upstream_started_ns = time.perf_counter_ns()
        try:
            async for response in backend.infer_decoupled(request):
                yield response
        finally:
            exchange.upstream_ns = time.perf_counter_ns() - exchange.upstream_started_ns
            if sequence is not None and sequence[2]:
                self.sequences.end(entry.name, sequence[0])

    def batch_counters(self, model: str, version: str) -> None:
        return None  # the direct path never batches
