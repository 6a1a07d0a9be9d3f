"""The request path of one inference: resolve → validate → dispatch → observe.

    resolve    model name/version → ModelEntry (signature, statistics); NOT_FOUND when unknown
    validate   gateway/server/validation.py, before anything is forwarded
    dispatch   a Dispatcher: DirectDispatcher routes and sends; the batching stage wraps it
    observe    observers see every finished request's Exchange (statistics, drift, metrics, traces)

The stages are seams: each later stage (batching, drift, telemetry) plugs in here without the gRPC
handlers knowing about it. An Exchange (gateway/server/exchange.py) travels with each admitted
request and collects what the stages learn about it; requests refused before admission (unknown
model, invalid tensors) go to `refusal_observers` instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from gateway.errors import GatewayError, NotFound, Unavailable, Unimplemented
from gateway.protocol import triton_messages as triton
from gateway.routing.router import STICKY, Router
from gateway.routing.sequences import SequenceTable
from gateway.server.exchange import Exchange
from gateway.server.stats import ModelStats
from gateway.server.validation import ModelSignature, validate_request
from gateway.upstream.backend import Backend
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.stream import FINAL_FLAG_REQUEST, FINAL_FLAG_RESPONSE

DEFAULT_SEQUENCE_IDLE_S = 60.0


@dataclass(eq=False)  # identity: an entry is a hashable key of per-model series on the hot path
class ModelEntry:
    """A routed model version as the hot path sees it: resolved once, then a dict lookup."""

    name: str
    version: str
    signature: ModelSignature
    stats: ModelStats = field(default_factory=ModelStats)


#: An observer sees (exchange, response or None, error or None) once per admitted request.
Observer = Callable[[Exchange, object, "GatewayError | None"], None]
#: A refusal observer sees (model name, version, error, elapsed ns) of a request refused before admission.
RefusalObserver = Callable[[str, str, GatewayError, int], None]
#: Starts the trace of a request (or returns None when it is not sampled); see gateway/telemetry/tracing.py.
TraceStarter = Callable[[ModelEntry, object, "tuple | None", int], object]


class Dispatcher(Protocol):
    async def infer(self, exchange: Exchange, deadline: float | None): ...

    def infer_decoupled(self, exchange: Exchange, deadline: float | None) -> AsyncIterator: ...

    def batch_stats(self, model: str, version: str):
        """The model's BatchStats, or None when the dispatcher does not batch it."""


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

    def __init__(self, router: Router, sequences: SequenceTable, retry_unavailable: bool = True, clock=time.monotonic):
        self.router = router
        self.sequences = sequences
        self.retry_unavailable = retry_unavailable
        self._clock = clock
        self.traced_send: Callable | None = None

    def _pick(self, entry: ModelEntry, request) -> tuple[Backend, str, tuple | None]:
        sequence = sequence_of(request) if entry.signature.sequence else None
        if sequence is None:
            return (*self.router.choose(entry.name, entry.version), None)
        sequence_id, start, _ = sequence
        backend = None if start else self.sequences.lookup(entry.name, sequence_id)
        if backend is not None and not backend.healthy:
            self.sequences.end(entry.name, sequence_id)
            raise Unavailable(
                f"sequence {sequence_id!r} of model '{entry.name}' lived on backend {backend.address}, which is "
                "no longer healthy; its state is lost: start the sequence again"
            )
        if backend is not None:
            return backend, STICKY, sequence
        backend, reason = self.router.choose(entry.name, entry.version)
        self.sequences.bind(entry.name, sequence_id, backend, self.sequences_idle(entry))
        return backend, reason, sequence

    def _set_timeout(self, request, deadline: float | None) -> None:
        # Triton takes a per-request timeout (µs) as the "timeout" parameter: the client's deadline,
        # carried across the stream, which has no per-message deadline of its own.
        if deadline is not None and "timeout" not in request.parameters:
            remaining_us = int((deadline - self._clock()) * 1e6)
            request.parameters["timeout"].int64_param = max(remaining_us, 1)

    async def _send(self, backend: Backend, exchange: Exchange, deadline: float | None):
        exchange.backend = backend
        if exchange.trace is not None and self.traced_send is not None:
            return await self.traced_send(backend, exchange, deadline)
        return await backend.infer(exchange.request)

    async def infer(self, exchange: Exchange, deadline: float | None):
        entry, request = exchange.entry, exchange.request
        backend, exchange.route, sequence = self._pick(entry, request)
        self._set_timeout(request, deadline)
        exchange.upstream_started_ns = time.perf_counter_ns()
        try:
            return await self._send(backend, exchange, deadline)
        except Unavailable:
            retry_allowed = (
                self.retry_unavailable
                and (sequence is None or sequence[1])
                and (deadline is None or deadline - self._clock() > 0.001)
            )
            if not retry_allowed:
                raise
            retry_backend, exchange.route = self.router.choose(entry.name, entry.version, exclude=backend)
            if sequence is not None:
                self.sequences.bind(entry.name, sequence[0], retry_backend, self.sequences_idle(entry))
            return await self._send(retry_backend, exchange, deadline)
        finally:
            exchange.upstream_ns = time.perf_counter_ns() - exchange.upstream_started_ns
            if sequence is not None and sequence[2]:
                self.sequences.end(entry.name, sequence[0])

    def batch_stats(self, model: str, version: str) -> None:
        return None  # the direct path never batches

    def sequences_idle(self, entry: ModelEntry) -> float:
        return entry.signature.sequence_idle_s or DEFAULT_SEQUENCE_IDLE_S

    async def infer_decoupled(self, exchange: Exchange, deadline: float | None):
        entry, request = exchange.entry, exchange.request
        backend, exchange.route, sequence = self._pick(entry, request)
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


class Pipeline:
    """Resolves, validates, dispatches and observes inference requests."""

    def __init__(self, catalog: ModelCatalog, router: Router, dispatcher: Dispatcher) -> None:
        self.catalog = catalog
        self.router = router
        self.dispatcher = dispatcher
        self.observers: list[Observer] = [self._count]
        self.refusal_observers: list[RefusalObserver] = []
        self.trace_starter: TraceStarter | None = None
        self._entries: dict[tuple[str, str], ModelEntry] = {}

    def __repr__(self) -> str:
        return f"<Pipeline models={len(self._entries)} observers={len(self.observers)}>"

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    async def resolve(self, model: str, version: str) -> ModelEntry:
        entry = self._entries.get((model, version))
        if entry is not None:
            return entry
        if not model:
            raise NotFound(triton.UNKNOWN_MODEL.format(model=model) + "; model_name is empty, expected the name of a model")
        if not self.router.routes(model):
            raise self.catalog.not_found(model, version)
        info = await self.catalog.get(model, version)
        signature = info.signature
        # One entry per concrete version, shared by the unversioned alias that points at it.
        concrete = self._entries.get((model, signature.version))
        if concrete is None:
            concrete = ModelEntry(model, signature.version, signature)
            self._entries[(model, signature.version)] = concrete
        if version:
            self._entries[(model, version)] = concrete
        return concrete

    def forget_unversioned(self) -> None:
        """The default version of a model may move when the fleet changes: resolve it again."""
        for key in [k for k in self._entries if not k[1]]:
            del self._entries[key]

    async def _admit(self, request, started_ns: int, unary: bool = False) -> ModelEntry:
        """Resolve the request's model and validate the request against it; a refusal is observed too.
        `unary`: the request came by ModelInfer, which a decoupled model refuses before any check."""
        try:
            entry = await self.resolve(request.model_name, request.model_version)
            if unary and entry.signature.decoupled:
                # Triton's refusal, then what to do instead.
                raise Unimplemented(
                    f"{triton.DECOUPLED_UNARY.format()}: model '{entry.name}' is decoupled (it may send any "
                    "number of responses); use the streaming API (ModelStreamInfer) for it"
                )
            validate_request(request, entry.signature)
        except GatewayError as error:
            self.refused(request.model_name, request.model_version, error, started_ns)
            raise
        return entry

    def refused(self, model: str, version: str, error: GatewayError, started_ns: int) -> None:
        """Tell the refusal observers of a request refused before admission (also by the front door,
        for a request that does not even parse)."""
        elapsed = time.perf_counter_ns() - started_ns
        for observe in self.refusal_observers:
            observe(model, version, error, elapsed)

    def _exchange(self, entry: ModelEntry, request, metadata, started_ns: int) -> Exchange:
        trace = self.trace_starter(entry, request, metadata, started_ns) if self.trace_starter is not None else None
        return Exchange(entry, request, started_ns, trace)

    def _observe(self, exchange: Exchange, response, error) -> None:
        exchange.elapsed_ns = time.perf_counter_ns() - exchange.started_ns
        for observe in self.observers:
            observe(exchange, response, error)

    async def infer(self, request, deadline: float | None, metadata=None):
        """One response for one request (ModelInfer). `metadata`: the call's gRPC metadata (trace context)."""
        started = time.perf_counter_ns()
        entry = await self._admit(request, started, unary=True)
        response = await self._infer_one(self._exchange(entry, request, metadata, started), deadline)
        # The backend call rode a stream; Triton puts `triton_final_response` on stream responses only.
        if FINAL_FLAG_RESPONSE in response.parameters:
            del response.parameters[FINAL_FLAG_RESPONSE]
        return response

    async def _infer_one(self, exchange: Exchange, deadline: float | None):
        client_id = exchange.request.id
        response = error = None
        try:
            response = await self.dispatcher.infer(exchange, deadline)
            response.id = client_id
            return response
        except GatewayError as failure:
            error = failure
            raise
        finally:
            self._observe(exchange, response, error)

    async def infer_stream(self, request, deadline: float | None, metadata=None):
        """Yield every response of one request (one for ordinary models, any number if decoupled)."""
        started = time.perf_counter_ns()
        entry = await self._admit(request, started)
        exchange = self._exchange(entry, request, metadata, started)
        if not entry.signature.decoupled:
            yield await self._infer_one(exchange, deadline)
            return
        client_id = request.id
        wants_final_flag = (
            FINAL_FLAG_REQUEST in request.parameters and request.parameters[FINAL_FLAG_REQUEST].bool_param
        )
        error = None
        try:
            async for response in self.dispatcher.infer_decoupled(exchange, deadline):
                response.id = client_id
                if not wants_final_flag and not response.outputs:
                    # The gateway always asks the backend for the empty final response (to know
                    # when the request is complete); a client that did not ask for it gets
                    # Triton's own behaviour: no empty final response.
                    final = response.parameters.get(FINAL_FLAG_RESPONSE)
                    if final is not None and final.bool_param:
                        continue
                yield response
        except GatewayError as failure:
            error = failure
            raise
        finally:
            self._observe(exchange, None, error)

    @staticmethod
    def _count(exchange: Exchange, response, error) -> None:
        exchange.entry.stats.record(error is None, exchange.elapsed_ns)
