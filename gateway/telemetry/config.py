"""Config of the telemetry stage: OpenTelemetry metrics, scraped by Prometheus and/or pushed over OTLP."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ConfigError


@dataclass(frozen=True)
class TelemetryConfig:
    """`telemetry:` — where the gateway's metrics go. With neither exporter set, no metrics are kept."""

    prometheus_port: int | None = None
    """Serve a Prometheus scrape endpoint (`/metrics`) on this port (0 picks a free one)."""
    prometheus_host: str = "127.0.0.1"
    """Address the scrape endpoint binds. Local by default: the metrics name every model, backend
    address and error rate, which is for the operator's Prometheus, not for whoever can reach the
    host. Set `0.0.0.0` (or the pod's address) where a Prometheus on another host scrapes it."""
    otlp_endpoint: str | None = None
    """Push metrics over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`)."""
    otlp_headers: dict[str, str] = field(default_factory=dict)
    """Headers sent with every OTLP export (e.g. an API key)."""
    otlp_interval_s: float = 10.0
    """Seconds between OTLP exports."""
    otlp_insecure: bool = True
    """Plaintext gRPC to the collector (set false for TLS)."""
    otlp_histogram: str = "explicit"
    """Histograms over OTLP: `explicit` buckets (what a collector exporting to Prometheus reads) or
    `exponential` (OpenTelemetry's base-2 exponential histogram, for OTLP-native backends). The
    buckets are the same either way: powers of √2."""
    trace_sampling_ratio: float = 0.0
    """Fraction of requests traced (0 = tracing off, 1 = all), exported over OTLP to `otlp_endpoint`.
    A request whose client sent a sampled W3C `traceparent` is always traced."""
    trace_export_interval_s: float = 5.0
    """Seconds between span exports (sooner when 512 spans are waiting). OpenTelemetry's default
    (OTEL_BSP_SCHEDULE_DELAY): each export has a fixed cost in the gateway's process (the OTLP
    call, ~0.5-2 ms of CPU), so a gateway tracing 1 % of a few hundred requests a second spends
    several times less on exports sending ~50 spans every 5 s than ~10 every second."""
    service_name: str = "tensorgate"
    """`service.name` of the exported metrics and spans (tell replicas apart with instance attributes
    of your collector, or a name per deployment)."""

    @property
    def enabled(self) -> bool:
        return self.prometheus_port is not None or bool(self.otlp_endpoint)

    @property
    def tracing(self) -> bool:
        return bool(self.otlp_endpoint) and self.trace_sampling_ratio > 0

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
        if not self.trace_export_interval_s > 0:
            raise ConfigError(f"{path}.trace_export_interval_s", "expected a positive number of seconds")
        if self.otlp_histogram not in ("explicit", "exponential"):
            raise ConfigError(f"{path}.otlp_histogram", f"expected explicit or exponential, got {self.otlp_histogram!r}")
        if not 0.0 <= self.trace_sampling_ratio <= 1.0:
            raise ConfigError(f"{path}.trace_sampling_ratio",
                              f"expected a fraction of requests from 0 to 1, got {self.trace_sampling_ratio}")
        if self.trace_sampling_ratio > 0 and not self.otlp_endpoint:
            raise ConfigError(f"{path}.trace_sampling_ratio",
                              "traces are exported over OTLP: set telemetry.otlp_endpoint as well")
        if not self.service_name:
            raise ConfigError(f"{path}.service_name", "expected a non-empty service name")
