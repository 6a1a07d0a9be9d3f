"""Config of admission: how many requests, and how many request bytes, the gateway holds at once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gateway.errors import ConfigError

GIB = 1024 * 1024 * 1024


def default_max_request_bytes() -> int:
    """A quarter of the machine's memory, at most 1 GiB (a share of RAM, so a small pod is not
    sized for a large host). Request bytes are the serialized requests the gateway holds."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return GIB
    return max(64 * 1024 * 1024, min(GIB, memory // 4))


@dataclass(frozen=True)
class ModelLimits:
    """Limits of one model's admitted requests (queued in the gateway or at a backend)."""

    max_inflight: int | None = None
    """Requests of the model admitted and not yet answered; None: no limit of its own."""
    max_request_bytes: int | None = None
    """Bytes of the model's admitted requests; None: no limit of its own."""

    def validate(self, path: str) -> None:
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError(f"{path}.max_inflight", "expected at least 1 request (or leave it out: no limit)")
        if self.max_request_bytes is not None and self.max_request_bytes < 1024:
            raise ConfigError(f"{path}.max_request_bytes", "expected at least 1024 bytes (or leave it out: no limit)")


@dataclass(frozen=True)
class AdmissionConfig:
    """`admission:` — load shedding. A request over a limit is refused at once with
    RESOURCE_EXHAUSTED and the trailing metadata `grpc-retry-pushback-ms` (nothing of it is queued
    or sent), so the gateway's memory and latency stay bounded under overload.

        admission:
          max_request_bytes: 1073741824    # all requests held, serialized (default: ¼ of RAM, ≤ 1 GiB)
          max_inflight: 10000              # all requests admitted and not yet answered
          model_default: {max_inflight: 2048}
          models:
            resnet: {max_inflight: 256, max_request_bytes: 268435456}

    A request counts from the moment the front door has its message until its answer is sent or
    it fails or is cancelled. Requests queued for batching are also bounded per queue by
    `batching.max_queue_size`.
    """

    max_request_bytes: int = field(default_factory=default_max_request_bytes)
    """Bytes of all requests held (their serialized size). One request larger than this is still
    admitted when nothing else is held (it is bounded by `server.max_message_bytes`)."""
    max_inflight: int = 10_000
    """Requests admitted and not yet answered, over all models."""
    model_default: ModelLimits = field(default_factory=ModelLimits)
    """Limits every model gets unless `models` names it."""
    models: dict[str, ModelLimits] = field(default_factory=dict)
    """Per-model limits, replacing `model_default` for the models named."""
    retry_pushback_ms: int = 50
    """What `grpc-retry-pushback-ms` tells a refused client to wait before it retries."""

    def validate(self, path: str) -> None:
        if self.max_request_bytes < 1024:
            raise ConfigError(f"{path}.max_request_bytes", "expected at least 1024 bytes")
        if self.max_inflight < 1:
            raise ConfigError(f"{path}.max_inflight", "expected at least 1 request")
        if self.retry_pushback_ms < 0:
            raise ConfigError(f"{path}.retry_pushback_ms", "expected zero or more milliseconds")

    def limits_of(self, model: str) -> ModelLimits:
        return self.models.get(model, self.model_default)
