"""The direct dispatcher: pick a backend for a request (sticky for sequences), send it, retry elsewhere.

It implements the pipeline's `Dispatcher` contract (gateway/pipeline/contracts.py); the batching
stage wraps it and hands it whole batches as single requests.

The retry rule. A request is sent again, to a backend it has not tried, only when
- its backend could not answer it: UNAVAILABLE (refused or broken connection, Triton's full
  queue, an ejected backend's pending request: Abandoned). Any answer — a model's error,
  INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED — is final;
- it is not a step of a sequence past its start (its state lives on the backend it was bound to:
  sending it elsewhere could run a step twice or on missing state); a decoupled request is never
  resent once sent (responses may already have reached the client);
- the client's deadline leaves at least MIN_RETRY_ROOM_S; it has had fewer than
  `routing.max_attempts` attempts; and the retry budget allows it (routing/retry_budget.py).
  A request failed over from an ejected backend is not charged to the budget: what can be
  pending on a backend is bounded, and moving it is the point of ejecting.
Inference on a stateless model is taken to be idempotent: a request whose connection broke after
Triton read it may run twice, and its one answer reaches the client.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable

from gateway.errors import Abandoned, DeadlineExceeded, Unavailable, shown
from gateway.pipeline.contracts import TracedSend
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.routing.hedging import Hedging
from gateway.routing.mirror import Mirror
from gateway.routing.retry_budget import RetryBudget
from gateway.routing.router import STICKY, Router
from gateway.routing.sequences import SequenceTable
from gateway.upstream.backend import Backend

#: How long an idle sequence stays bound when neither the config nor the model says.
DEFAULT_SEQUENCE_IDLE_S = 60.0
#: A probe copy's own deadline: a pool out for missing its objective may be very slow.
PROBE_TIMEOUT_S = 30.0

#: Least time the client's deadline must leave for a retry to be sent.
MIN_RETRY_ROOM_S = 0.002


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
    """Routes each request to a backend and sends it there; resends it elsewhere by the retry rule.

    Notes on the exchange which backend served it, why it was picked, and how long the call took.
    A traced exchange goes through `traced_send` (gateway/telemetry/tracing.py), which carries the
    trace context to Triton. `retries` counts resends charged to the budget, `failovers` those of
    requests abandoned by an ejected backend, `retries_refused` those the budget refused.
    """

    def __init__(
        self, router: Router, sequences: SequenceTable, retry_unavailable: bool = True, clock=time.monotonic,
        probes: Mirror | None = None, max_attempts: int = 3, budget: RetryBudget | None = None,
        hedging: Hedging | None = None,
    ):
        self.router = router
        self.probes = probes or Mirror(4)  # copies measuring pools out for missing their objective
        self.sequences = sequences
        self.retry_unavailable = retry_unavailable
        self.max_attempts = max_attempts
        self.budget = budget or RetryBudget(clock=clock)
        self._clock = clock
        self.traced_send: TracedSend | None = None
        self.batch_observers: list = []  # the Dispatcher contract's; this dispatcher never merges requests
        self.hedging = hedging  # None: no hedged requests (the default)
        self.retries = 0
        self.failovers = 0
        self.retries_refused = 0
        self.hedges = 0

    def __repr__(self) -> str:
        return (f"<DirectDispatcher {self.sequences!r} retry_unavailable={self.retry_unavailable} "
                f"retries={self.retries} failovers={self.failovers} refused={self.retries_refused}>")

    def _may_resend(self, failure: Unavailable, sequence, deadline: float | None, attempts: int) -> bool:
        """The retry rule (module docstring); a retry it allows is counted (and charged)."""
        if not self.retry_unavailable or attempts >= self.max_attempts:
            return False
        if sequence is not None and not sequence[1]:
            return False
        if deadline is not None and deadline - self._clock() < MIN_RETRY_ROOM_S:
            return False
        if isinstance(failure, Abandoned):
            self.failovers += 1
            return True
        if self.budget.withdraw():
            self.retries += 1
            return True
        self.retries_refused += 1
        return False

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
        self.budget.requests += 1
        ahead = backend.outstanding
        exchange.upstream_started_ns = started = time.perf_counter_ns()
        try:
            try:
                if self.hedging is not None and sequence is None:
                    response = await self._hedged(backend, exchange, deadline)
                else:
                    response = await self._send(backend, exchange, deadline)
                self.router.observe(entry.name, entry.version, exchange.backend,
                                    (time.perf_counter_ns() - started) / 1e9, ahead)
                return response
            except DeadlineExceeded:  # slow is what a deadline measures: the router learns it too
                self.router.observe(entry.name, entry.version, backend, (time.perf_counter_ns() - started) / 1e9, ahead)
                raise
            except Unavailable as error:
                failure = error
            tried = (backend,)
            while self._may_resend(failure, sequence, deadline, len(tried)):
                if sequence is None:
                    backend, exchange.route = self.router.choose(entry.name, entry.version, exclude=tried)
                else:  # a start that failed: the runner-up, as rendezvous ranks them
                    backend, exchange.route = self.router.choose_for_sequence(
                        entry.name, entry.version, sequence[0], exclude=tried)
                    self.sequences.bind(entry.name, sequence[0], backend, self.sequence_idle_s(entry))
                try:
                    return await self._send(backend, exchange, deadline)
                except Unavailable as error:
                    failure = error
                tried += (backend,)
            raise failure
        finally:
            exchange.upstream_ns = time.perf_counter_ns() - exchange.upstream_started_ns
            if sequence is not None and sequence[2]:
                self.sequences.end(entry.name, sequence[0])

    async def _hedged(self, backend: Backend, exchange: Exchange, deadline: float | None):
        """Send to `backend`; if it has not answered within the model's p95 (routing/hedging.py),
        send to a second backend too (charged to the retry budget); the first answer wins and the
        other call is cancelled. An error from one waits for the other."""
        hedging, entry = self.hedging, exchange.entry
        started = time.perf_counter()
        first = asyncio.ensure_future(self._send(backend, exchange, deadline))
        delay = hedging.delay_of(entry)
        if delay is not None:
            try:
                await asyncio.wait((first,), timeout=delay)
            except BaseException:  # the caller was cancelled: so is its call
                first.cancel()
                raise
        if first.done() or delay is None or (deadline is not None and deadline - self._clock() < MIN_RETRY_ROOM_S):
            response = await first
            hedging.window(entry).add(time.perf_counter() - started)
            return response
        try:
            second_backend, _ = self.router.choose(entry.name, entry.version, exclude=backend)
        except Unavailable:
            second_backend = None
        if second_backend is None or not self.budget.withdraw():
            if second_backend is not None:
                self.retries_refused += 1
            try:
                return await first
            finally:
                first.cancel()  # a no-op once it is done; the caller's cancellation reaches it
        self.hedges += 1
        second = asyncio.ensure_future(self._send(second_backend, exchange, deadline))
        owners = {first: backend, second: second_backend}
        pending = set(owners)
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for call in done:
                    if call.exception() is None or not pending:
                        exchange.backend = owners[call]
                        return call.result()
        finally:
            for call in pending:
                call.cancel()

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
