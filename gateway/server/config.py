"""Config of the front door: where the gateway listens and what it accepts."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

ENGINES = ("auto", "envoy", "grpcio")

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

    engine: str = "auto"
    """What serves the front door: `envoy` (Envoy's HTTP/2 through pyvoy, the gateway's Python
    inside the Envoy process; ~0.3× grpc.aio's CPU per request, benchmarks/RESULTS.md), `grpcio`
    (grpc.aio, in the gateway's own process), or `auto`: envoy where pyvoy is installed (Python
    3.11+), grpcio otherwise."""
    envoy_threads: int | None = None
    """envoy engine: Envoy's worker threads (its C++ side); None: one per core."""
    reflection: bool = False
    """Serve gRPC server reflection (`grpc.reflection.v1alpha.ServerReflection`), which lists and
    describes every service, the admin API included, to anyone who can connect. Off by default:
    clients of the inference protocol ship its protos (tritonclient does), and a gateway facing
    untrusted networks should not hand out a map of its admin API. Turn it on for grpcurl, Postman
    or grpc_cli without proto files."""
    config_poll_s: float = 2.0
    """How often `tensorgate serve` checks its config file for a change of content, and reloads it
    (0: only on SIGHUP and the admin ReloadConfig)."""
    max_pending_calls: int = 65536
    """grpcio engine: calls grpc core has received but not yet handed to the gateway's Python (a
    burst on one busy connection). grpc's own default drops them at random from 1,000 pending
    (all beyond 3,000) as CANCELLED, a status clients do not retry and the gateway never sees: 6–9 %
    of 2,000 concurrent calls on one channel. Up to this many wait their turn instead; overload is
    refused by the gateway's own limits, with a status a client can act on."""

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        available = sys.version_info >= (3, 11) and importlib.util.find_spec("pyvoy") is not None
        return "envoy" if available else "grpcio"

    def validate(self, path: str) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"{path}.engine", f"expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "envoy" and importlib.util.find_spec("pyvoy") is None:
            raise ConfigError(f"{path}.engine", "envoy needs the pyvoy package (Python 3.11+); use grpcio")
        if self.envoy_threads is not None and self.envoy_threads < 1:
            raise ConfigError(f"{path}.envoy_threads", "expected at least 1 thread")
        if not self.name.strip():
            raise ConfigError(f"{path}.name", "expected a non-empty server name")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"{path}.max_message_bytes", "expected at least 1024 bytes")
        if self.max_pending_calls < 1:
            raise ConfigError(f"{path}.max_pending_calls", "expected at least 1 call")
        if self.config_poll_s < 0:
            raise ConfigError(f"{path}.config_poll_s", "expected zero (no watching) or more seconds")
        if self.grace_s < 0:
            raise ConfigError(f"{path}.grace_s", "expected zero or more seconds")
