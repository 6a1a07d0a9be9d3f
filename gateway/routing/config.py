"""Config of the routing stage: which pools serve which model, in preference order."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError


@dataclass(frozen=True)
class ModelRoute:
    """The route of one model: its pools in preference order."""

    pools: tuple[str, ...]
    """Pool names, most preferred first; the next is used when a pool has no healthy backend."""
    sequence_idle_timeout_s: float | None = None
    """A sequence unused this long is forgotten. Default: the model's own
    sequence_batching.max_sequence_idle_microseconds, or 60 s when it has none."""

    def validate(self, path: str) -> None:
        if not self.pools:
            raise ConfigError(f"{path}.pools", "expected at least one pool name")
        if self.sequence_idle_timeout_s is not None and self.sequence_idle_timeout_s <= 0:
            raise ConfigError(f"{path}.sequence_idle_timeout_s", "expected a positive number of seconds")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing behaviour common to all models."""

    retry_unavailable: bool = True
    """Resend a request to another backend when its backend could not answer it (UNAVAILABLE),
    while the client's deadline leaves room; see gateway/routing/dispatcher.py for the rule."""
    max_attempts: int = 3
    """Attempts of one request at most, the first included."""
    retry_budget_ratio: float = 0.2
    """Retries may add at most this share of the requests sent (plus `retry_budget_min_per_s`);
    requests failed over from an ejected backend are not charged."""
    retry_budget_min_per_s: float = 10.0
    """Retries per second allowed whatever the traffic (a quiet gateway may still retry)."""

    hedge_after_p95: bool = False
    """Hedged requests (gateway/routing/hedging.py): a request its backend has not answered within
    the model's observed 95th-percentile backend latency is sent to a second backend too, and the
    first answer wins. Charged to the retry budget. Off by default: it costs a task per request."""
    hedge_min_delay_ms: float = 1.0
    """The least wait before a hedge, whatever the p95."""

    def validate(self, path: str) -> None:
        if self.hedge_min_delay_ms < 0:
            raise ConfigError(f"{path}.hedge_min_delay_ms", "expected zero or more milliseconds")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigError(f"{path}.max_attempts", "expected 1 to 10 attempts")
        if not 0 <= self.retry_budget_ratio <= 1:
            raise ConfigError(f"{path}.retry_budget_ratio", "expected a share from 0 to 1")
        if self.retry_budget_min_per_s < 0:
            raise ConfigError(f"{path}.retry_budget_min_per_s", "expected zero or more retries per second")
