"""Load shedding: bounds on the requests and request bytes held, for the gateway and per model.

A `Gate` counts what is admitted and not yet finished against its limits; a request over a limit
is refused at once with RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms` (nothing is queued, nothing
is sent). Admission is a comparison and two integer additions; release, two subtractions, on every
way a request ends (answer, error, cancellation: the callers release in `finally`).

    front door   the gateway's Gate: every inference message, by its serialized size, before it
                 is parsed (a refused request costs no parse)
    pipeline     the model's Gate: after the model is known and the request validated

Invariant: `inflight` and `held_bytes` are what was admitted minus what was released, never below
zero; a request is released by the same Gate and size that admitted it.
"""

from __future__ import annotations

import sys

from gateway.errors import ResourceExhausted
from gateway.pipeline.config import AdmissionConfig, ModelLimits

_UNLIMITED = sys.maxsize


class Gate:
    """Requests and bytes held under one set of limits (the whole gateway, or one model)."""

    __slots__ = ("name", "max_inflight", "max_bytes", "inflight", "held_bytes", "shed", "pushback_ms", "on_refused")

    def __init__(self, name: str, max_inflight: int | None, max_bytes: int | None, pushback_ms: int) -> None:
        self.name = name
        self.max_inflight = _UNLIMITED if max_inflight is None else max_inflight
        self.max_bytes = _UNLIMITED if max_bytes is None else max_bytes
        self.inflight = 0
        self.held_bytes = 0
        self.shed = 0  # requests refused by this gate
        self.pushback_ms = pushback_ms
        self.on_refused = None  # called with each refusal (the gateway's gate: the refusal observers)

    def __repr__(self) -> str:
        return (f"<Gate {self.name} inflight={self.inflight}/{self.max_inflight} "
                f"bytes={self.held_bytes}/{self.max_bytes} shed={self.shed}>")

    def admit(self, size: int) -> None:
        """Count one request of `size` bytes in, or raise ResourceExhausted (counted as shed).

        A request larger than the byte limit alone is admitted when nothing else is held: it can
        only ever be served that way (the message size limit bounds it)."""
        held = self.held_bytes
        if self.inflight >= self.max_inflight or (held + size > self.max_bytes and held):
            raise self._refusal(size)
        self.inflight += 1
        self.held_bytes = held + size

    def release(self, size: int) -> None:
        self.inflight -= 1
        self.held_bytes -= size

    def _refusal(self, size: int) -> ResourceExhausted:
        error = self._refusal_error(size)
        if self.on_refused is not None:
            self.on_refused(error)
        return error

    def _refusal_error(self, size: int) -> ResourceExhausted:
        self.shed += 1
        if self.inflight >= self.max_inflight:
            what = f"{self.inflight} requests in flight, the limit is {self.max_inflight}"
        else:
            what = (f"{self.held_bytes} request bytes held and this request has {size}, "
                    f"the limit is {self.max_bytes}")
        return ResourceExhausted(
            f"{self.name} is overloaded ({what}); the request was not queued: retry after "
            f"{self.pushback_ms} ms, on another gateway, or with less load", self.pushback_ms)

    def snapshot(self) -> dict[str, int]:
        return {"inflight": self.inflight, "max_inflight": self.max_inflight, "held_bytes": self.held_bytes,
                "max_bytes": self.max_bytes, "shed": self.shed}


class Admission:
    """The gateway's gate and one gate per model, built from `admission:`."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config = config or AdmissionConfig()
        self.total = Gate("the gateway", config.max_inflight, config.max_request_bytes, config.retry_pushback_ms)
        self._models: dict[str, Gate] = {}

    def __repr__(self) -> str:
        return f"<Admission {self.total!r} models={len(self._models)}>"

    def gate_of(self, model: str) -> Gate:
        """The model's gate (one per model name, shared by its versions); unlimited if configured so."""
        gate = self._models.get(model)
        if gate is None:
            limits: ModelLimits = self.config.limits_of(model)
            gate = Gate(f"model '{model}'", limits.max_inflight, limits.max_request_bytes,
                        self.config.retry_pushback_ms)
            self._models[model] = gate
        return gate

    def shed(self) -> dict[str, int]:
        """Requests refused so far: by the gateway's limits ('' key) and by each model's."""
        counts = {"": self.total.shed}
        counts.update({name: gate.shed for name, gate in list(self._models.items())})
        return counts

    def snapshot(self) -> dict:
        return {"gateway": self.total.snapshot(),
                "models": {name: gate.snapshot() for name, gate in sorted(self._models.items())}}
