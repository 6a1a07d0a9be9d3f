"""The request path of one inference: resolve → validate → dispatch → observe.

    resolve    model name/version → ModelEntry (signature, statistics); NOT_FOUND when unknown
    validate   gateway/pipeline/validation.py, before anything is forwarded; its structural checks
               once per request layout (gateway/pipeline/layout.py)
    admit      the model's admission gate (gateway/pipeline/admission.py): RESOURCE_EXHAUSTED at
               once over its limits on requests and bytes held
    dispatch   a Dispatcher: routing's DirectDispatcher routes and sends; the batching stage wraps it
    observe    observers see every finished request's Exchange (statistics, drift, metrics, traces)

The stages are seams (gateway/pipeline/contracts.py): each later stage plugs in through `attach`
without the front door knowing about it. An Exchange (gateway/pipeline/exchange.py) travels with
each admitted request and collects what the stages learn about it; requests refused before
admission (unknown model, invalid tensors) go to the refusal observers instead.
"""

from __future__ import annotations

import time
from typing import Callable

from gateway.errors import GatewayError, NotFound, Unimplemented
from gateway.pipeline.admission import Admission
from gateway.pipeline.contracts import BatchObserver, CallHeaders, Dispatcher, Observer, RefusalObserver, TraceStarter
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.protocol import triton_messages as triton
from gateway.protocol.tensors import FINAL_FLAG_REQUEST, FINAL_FLAG_RESPONSE
from gateway.upstream.catalog import ModelCatalog

class Pipeline:
    """Resolves, validates, dispatches and observes inference requests."""

    def __init__(self, catalog: ModelCatalog, routes: Callable[[str], bool], dispatcher: Dispatcher,
                 admission: Admission | None = None) -> None:
        """`routes(model)` says whether this gateway routes the model at all (the router's answer);
        `admission`: the limits on requests and bytes held (the defaults when not given)."""
        self.admission = admission or Admission()
        # Refusals by the gateway's gate (at the front door, before a request is parsed) are counted
        # like any request refused before admission, under an unknown model.
        self.admission.total.on_refused = lambda error: self.refused("", "", error, time.perf_counter_ns())
        self.catalog = catalog
        self.routes = routes
        self.dispatcher = dispatcher
        self.observers: list[Observer] = [self._count]
        self.refusal_observers: list[RefusalObserver] = []
        self.trace_starter: TraceStarter | None = None
        self.in_flight = 0
        """Requests inside infer/infer_stream now: a config reload retires this pipeline at 0."""
        self.version_pickers: dict[str, Callable] = {}
        """model -> pick(request, call): sets the version of a request that names none (a traffic
        split; gateway/traffic/). Runs before the model is resolved; empty: nothing to pick."""
        self._entries: dict[tuple[str, str], ModelEntry] = {}

    def attach(
        self,
        observer: Observer | None = None,
        refusal_observer: RefusalObserver | None = None,
        trace_starter: TraceStarter | None = None,
        batch_observer: BatchObserver | None = None,
    ) -> None:
        """Plug a stage in: its observer of admitted requests, of refused ones, its trace starter, its
        observer of the batches the dispatcher merges. Observers run in the order they were attached;
        there is one trace starter."""
        if observer is not None:
            self.observers.append(observer)
        if batch_observer is not None:
            self.dispatcher.batch_observers.append(batch_observer)
        if refusal_observer is not None:
            self.refusal_observers.append(refusal_observer)
        if trace_starter is not None:
            if self.trace_starter is not None:
                raise ValueError("the pipeline already has a trace starter")
            self.trace_starter = trace_starter

    @property
    def traced(self) -> bool:
        """Whether requests may be traced."""
        return self.trace_starter is not None

    def _pick_version(self, request, call) -> None:
        picker = self.version_pickers.get(request.model_name)
        if picker is not None:
            picker(request, call)

    def __repr__(self) -> str:
        return f"<Pipeline models={len(self._entries)} observers={len(self.observers)}>"

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    async def info(self, model: str, version: str):
        """The ModelInfo (metadata, config, signature) of a routed model; NOT_FOUND otherwise."""
        if not self.routes(model):
            raise self.catalog.not_found(model, version)
        return await self.catalog.get(model, version)

    async def resolve(self, model: str, version: str) -> ModelEntry:
        entry = self._entries.get((model, version))
        if entry is not None:
            return entry
        if not model:
            raise NotFound(triton.UNKNOWN_MODEL.format(model=model) + "; model_name is empty, expected the name of a model")
        if not self.routes(model):
            raise self.catalog.not_found(model, version)
        info = await self.catalog.get(model, version)
        signature = info.signature
        # One entry per concrete version, shared by the unversioned alias that points at it.
        concrete = self._entries.get((model, signature.version))
        if concrete is None:
            concrete = ModelEntry(model, signature.version, signature)
            concrete.gate = self.admission.gate_of(model)
            self._entries[(model, signature.version)] = concrete
        # The unversioned alias too (forget_unversioned drops it when the fleet changes): without
        # it, every request that names no version went through routes() and the catalog again.
        self._entries[(model, version)] = concrete
        return concrete

    def forget_unversioned(self) -> None:
        """The default version of a model may move when the fleet changes: resolve it again."""
        for key in [k for k in self._entries if not k[1]]:
            del self._entries[key]

    def _known_entry(self, request) -> ModelEntry | None:
        """The request's model entry when it is already resolved (every request but the first few)."""
        return self._entries.get((request.model_name, request.model_version))

    async def _resolve_admitting(self, request, started_ns: int) -> ModelEntry:
        """resolve() for a request whose model is not resolved yet; a refusal is observed too."""
        try:
            return await self.resolve(request.model_name, request.model_version)
        except GatewayError as error:
            self.refused(request.model_name, request.model_version, error, started_ns)
            raise

    def _admit(self, entry: ModelEntry, request, started_ns: int, unary: bool = False) -> tuple | None:
        """Check the request against its model: ModelInfer on a decoupled model is refused before
        anything else (as Triton does; `unary`), then the request is validated, once per request
        layout (pipeline/layout.py). Returns the layout; a refusal is observed too."""
        if request.model_version and request.model_version != entry.version:
            # Triton reads " 1" and "01" as version 1; every transport upstream gets the version as it is.
            request.model_version = entry.version
        try:
            if unary and entry.signature.decoupled:
                # Triton's refusal, then what to do instead.
                raise Unimplemented(
                    f"{triton.DECOUPLED_UNARY.format()}: model '{entry.name}' is decoupled (it may send any "
                    "number of responses); use the streaming API (ModelStreamInfer) for it"
                )
            return entry.layouts.validate(request)
        except GatewayError as error:
            self.refused(request.model_name, request.model_version, error, started_ns)
            raise

    def refused(self, model: str, version: str, error: GatewayError, started_ns: int) -> None:
        """Tell the refusal observers of a request refused before admission (also by the front door,
        for a request that does not even parse)."""
        elapsed = time.perf_counter_ns() - started_ns
        for observe in self.refusal_observers:
            observe(model, version, error, elapsed)

    def _exchange(self, entry: ModelEntry, request, call, started_ns: int, layout: tuple | None) -> Exchange:
        trace = self.trace_starter(entry, request, call, started_ns) if self.trace_starter is not None else None
        exchange = Exchange(entry, request, started_ns, trace)
        exchange.layout = layout
        return exchange

    def _observe(self, exchange: Exchange, response, error) -> None:
        exchange.elapsed_ns = time.perf_counter_ns() - exchange.started_ns
        for observe in self.observers:
            observe(exchange, response, error)

    def _enter_gate(self, entry: ModelEntry, request, size: int, started_ns: int):
        """Admit the request under its model's limits (the caller releases it: `inflight` and
        `held_bytes` back down); a refusal is observed. Gate.admit, inlined: it runs per request."""
        gate = entry.gate
        held = gate.held_bytes
        if gate.inflight >= gate.max_inflight or (held + size > gate.max_bytes and held):
            try:
                gate.admit(size)  # raises, counted, with the refusal's words
            except GatewayError as error:
                self.refused(request.model_name, request.model_version, error, started_ns)
                raise
        gate.inflight += 1
        gate.held_bytes = held + size
        return gate

    async def infer(self, request, deadline: float | None, call: CallHeaders | None = None, size: int = 0):
        """One response for one request (ModelInfer). `call`: the call's headers (trace context, a
        split's sticky key); `size`: the request's serialized bytes (what the model's gate counts)."""
        started = time.perf_counter_ns()
        self.in_flight += 1
        try:
            if self.version_pickers:
                self._pick_version(request, call)
            # No coroutine layer for a model already resolved: resolving awaits only the first time.
            entry = self._known_entry(request) or await self._resolve_admitting(request, started)
            layout = self._admit(entry, request, started, unary=True)
            gate = self._enter_gate(entry, request, size, started)
            try:
                response = await self._infer_one(self._exchange(entry, request, call, started, layout), deadline)
            finally:
                gate.inflight -= 1
                gate.held_bytes -= size
        finally:
            self.in_flight -= 1
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

    async def infer_stream(self, request, deadline: float | None, call: CallHeaders | None = None, size: int = 0):
        """Yield every response of one request (one for ordinary models, any number if decoupled)."""
        self.in_flight += 1
        try:
            async for response in self._infer_stream(request, deadline, call, size):
                yield response
        finally:
            self.in_flight -= 1

    async def _infer_stream(self, request, deadline: float | None, call: CallHeaders | None = None, size: int = 0):
        started = time.perf_counter_ns()
        if self.version_pickers:
            self._pick_version(request, call)
        entry = self._known_entry(request) or await self._resolve_admitting(request, started)
        exchange = self._exchange(entry, request, call, started, self._admit(entry, request, started))
        gate = self._enter_gate(entry, request, size, started)
        try:
            if not entry.signature.decoupled:
                yield await self._infer_one(exchange, deadline)
                return
            async for response in self._infer_decoupled(exchange, request, deadline):
                yield response
        finally:
            gate.release(size)

    async def _infer_decoupled(self, exchange: Exchange, request, deadline: float | None):
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
        exchange.entry.counters.record(error is None, exchange.elapsed_ns)
