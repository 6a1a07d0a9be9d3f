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
    """Retry once on another backend when a backend is unreachable, while the deadline allows."""
