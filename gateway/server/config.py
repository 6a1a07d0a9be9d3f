"""Config of the front door: where the gateway listens and what it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """Limits of the gRPC front door."""

    max_message_bytes: int = 64 * 1024 * 1024
    """Largest request message accepted; larger ones get RESOURCE_EXHAUSTED naming the limit."""
    grace_s: float = 5.0
    """On shutdown, in-flight requests get this long to finish."""
    name: str = "triton"
    """The server name ServerMetadata reports. Stock Triton tooling checks for "triton" (Triton's
    example client simple_grpc_health_metadata.py fails on anything else); the gateway tells itself
    apart by its version and the ServerMetadata extension "tensorgate"."""

    def validate(self, path: str) -> None:
        if not self.name.strip():
            raise ConfigError(f"{path}.name", "expected a non-empty server name")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"{path}.max_message_bytes", "expected at least 1024 bytes")
        if self.grace_s < 0:
            raise ConfigError(f"{path}.grace_s", "expected zero or more seconds")
