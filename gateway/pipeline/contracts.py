"""The contracts between the pipeline and the stages that plug into it.

The pipeline (gateway/pipeline/core.py) knows these shapes only; the routing, batching, drift and
telemetry stages implement them, and gateway/app.py wires the implementations in. Each contract
states what the pipeline promises its implementations and what it expects back, in the manner of
grpc.aio's `_base_server.py`.
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Protocol

from gateway.errors import GatewayError
from gateway.pipeline.exchange import Exchange, ModelEntry


class CallHeaders(Protocol):
    """What the pipeline reads of a call (gateway/server/rpc.py's Call): a metadata value by key,
    for the client's trace context and a traffic split's sticky key. Only the requests that need a
    header look it up, so handing the call over costs nothing."""

    def header(self, key: str) -> str | bytes | None:
        """A value of metadata `key` (lower case), or None."""


class Dispatcher(Protocol):
    """Sends an admitted, validated request to a backend and returns what the backend answered.

    The pipeline calls exactly one of `infer` (models that answer once) or `infer_decoupled`
    (decoupled models) per request, after validation; the request is already checked against the
    model's signature, so a dispatcher never sees a malformed tensor. A dispatcher raises
    GatewayError for every failure a client should see (UNAVAILABLE, DEADLINE_EXCEEDED, a backend's
    status) and fills in what it learns on the exchange (backend, route, queue and backend time).
    `deadline` is an absolute `time.monotonic()` instant, or None for no deadline.

    `batch_observers` (a list the pipeline appends to, `Pipeline.attach(batch_observer=)`): a
    dispatcher that merges requests into batches calls each with every batch answered; one that
    never merges keeps the list and never calls it.
    """

    batch_observers: list

    def infer(self, exchange: Exchange, deadline: float | None) -> Awaitable:
        """An awaitable of the one response (an inference.ModelInferResponse) to `exchange.request`:
        a coroutine (`async def infer`), or a future where the dispatcher has no waiting of its own
        to do. The pipeline awaits it at once, so raising at the call is the same as at the await."""

    def infer_decoupled(self, exchange: Exchange, deadline: float | None) -> AsyncIterator:
        """Every response to `exchange.request`, the empty final one included (see FINAL_FLAG_RESPONSE)."""

    def batch_counters(self, model: str, version: str):
        """The model version's BatchCounters, or None when this dispatcher does not batch it."""


class Observer(Protocol):
    """Sees every admitted request once, after its last response or its error.

    Called on the event loop, on the request's own path: it must be cheap (a few µs) and must not
    raise — an observer that fails must contain its own failure, never fail the request it watches.
    `response` is the single response (None for decoupled models and on error); `error` is the
    GatewayError the client gets, or None.
    """

    def __call__(self, exchange: Exchange, response: object | None, error: GatewayError | None) -> None: ...


class BatchObserver(Protocol):
    """Sees every merged batch a dispatcher sent upstream and got answered, before its requests'
    responses are handed out: `batch` is the batch's own Exchange (its `members` are the requests in
    it, each with `merged` set), `response` the batch's whole response. An observer
    that counts rows can count a batch once instead of each of its requests (the drift stage does).
    Same rules as Observer; a batch that failed is not shown (its requests' observers see the error).
    A batch is shown whole even when one of its clients left while it was out: the backend answered
    every row of it.
    """

    def __call__(self, batch: Exchange, response: object) -> None: ...


class RefusalObserver(Protocol):
    """Sees every request refused before admission: an unknown model or version, invalid tensors, a
    request that does not even parse (model and version then empty). Same rules as Observer.
    `elapsed_ns` is the time from arrival to the refusal."""

    def __call__(self, model: str, version: str, error: GatewayError, elapsed_ns: int) -> None: ...


class TraceStarter(Protocol):
    """Decides on arrival whether a request is traced; returns the trace handle the exchange carries
    (`Exchange.trace`), or None when the request is not sampled. `call` is what the front door
    knows of the call (its `header(key)` holds the client's trace context; None when there is no
    call), `started_ns` the arrival time (perf_counter_ns)."""

    def __call__(self, entry: ModelEntry, request: object, call: CallHeaders | None, started_ns: int) -> object | None: ...


class TracedSend(Protocol):
    """Sends a traced exchange to `backend` in a way that carries its trace context to the backend,
    and returns the response; used by the direct dispatcher for exchanges whose `trace` is set."""

    async def __call__(self, backend, exchange: Exchange, deadline: float | None): ...
