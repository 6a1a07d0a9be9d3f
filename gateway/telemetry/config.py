"""Config of the telemetry stage: OpenTelemetry metrics, scraped by Prometheus and/or pushed over OTLP."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ConfigError


@dataclass(frozen=True)
class TelemetryConfig:
    """`telemetry:` — where the gateway's metrics go. With neither exporter set, no metrics are kept."""

    prometheus_port: int | None = None
    """Serve a Prometheus scrape endpoint (`/metrics`) on this port (0 picks a free one)."""
    prometheus_host: str = "0.0.0.0"
    """Address the scrape endpoint binds (127.0.0.1 to keep it local)."""
    otlp_endpoint: str | None = None
    """Push metrics over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`)."""
    otlp_headers: dict[str, str] = field(default_factory=dict)
    """Headers sent with every OTLP export (e.g. an API key)."""
    otlp_interval_s: float = 10.0
    """Seconds between OTLP exports."""
    otlp_insecure: bool = True
    """Plaintext gRPC to the collector (set false for TLS)."""

    @property
    def enabled(self) -> bool:
        return self.prometheus_port is not None or bool(self.otlp_endpoint)

    def validate(self, path: str) -> None:
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ConfigError(f"{path}.prometheus_port", f"expected a port 0-65535, got {self.prometheus_port}")
        if not self.prometheus_host:
            raise ConfigError(f"{path}.prometheus_host", "expected a host address, e.g. 0.0.0.0 or 127.0.0.1")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.strip():
            raise ConfigError(f"{path}.otlp_endpoint", "expected host:port or a URL of an OTLP/gRPC collector")
        for name in self.otlp_headers:
            if not name or name != name.lower():
                raise ConfigError(f"{path}.otlp_headers.{name}", "expected a non-empty lower-case gRPC metadata key")
        if not self.otlp_interval_s > 0:
            raise ConfigError(f"{path}.otlp_interval_s", "expected a positive number of seconds")
