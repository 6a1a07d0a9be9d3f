"""The gateway's configuration: one YAML file, validated once at load, errors naming the key path.

    listen: 127.0.0.1:8101
    pools:
      gpu: {backends: ["10.0.0.5:8001"]}
      cpu: {backends: ["127.0.0.1:9001", "127.0.0.1:9002"]}
      pods: {dns: "triton.models.svc.cluster.local:8001"}   # every address of a headless Service
    models:            # optional; without it every model the backends report is routed
      resnet: {pools: [gpu, cpu]}   # preference order

Optional sections: `server` (limits), `upstream` (transport to the backends: `grpc-stream` or `http`,
streams and connections per backend), `health` (check interval), `outlier` (passive ejection of
backends that fail or stall), `admission` (load shedding: limits on requests and bytes held),
`routing` (retries, retry budget), `batching` (gateway-side dynamic batching, per model), `drift` (drift
monitoring of model inputs and outputs, alerts and retraining captures), `telemetry` (OpenTelemetry
metrics: a Prometheus scrape endpoint and/or OTLP export), `auth` (tenants: bearer tokens or API keys,
model allow-lists, rates) and `limits` (what one request may hold). Each stage owns its dataclass;
this module composes them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.batching.config import BatchingConfig
from gateway.configfile import load_dataclass
from gateway.drift.config import DriftConfig
from gateway.errors import ConfigError
from gateway.pipeline.config import AdmissionConfig
from gateway.rollout.config import RolloutConfig
from gateway.routing.config import ModelRoute, RoutingConfig
from gateway.security.config import AuthConfig, LimitsConfig
from gateway.server.config import ServerConfig
from gateway.telemetry.config import TelemetryConfig
from gateway.upstream.config import HealthConfig, OutlierConfig, PoolConfig, UpstreamConfig, parse_address


@dataclass(frozen=True)
class GatewayConfig:
    listen: str
    """host:port the gateway's gRPC server binds (port 0 picks a free one)."""
    pools: dict[str, PoolConfig]
    """Named pools of Triton backends."""
    models: dict[str, ModelRoute] | None = None
    """Routes per model; when absent, every model a backend reports is routed over all pools, in
    the order they are written."""
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    auth: AuthConfig | None = None
    """Tenants, their credentials, model allow-lists and rates; None (the default): no authentication."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """What one inference request may hold (tensors, BYTES element size, per-model message size)."""

    def validate(self, path: str) -> None:
        host, port = self.listen.rpartition(":")[::2]
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError("listen", f"expected host:port (port 0 for any free port), got {self.listen!r}")
        if not self.pools:
            raise ConfigError("pools", "expected at least one pool")
        for model, route in (self.models or {}).items():
            for index, pool in enumerate(route.pools):
                if pool not in self.pools:
                    raise ConfigError(
                        f"models.{model}.pools[{index}]",
                        f"unknown pool {pool!r}; expected one of: {', '.join(self.pools)}",
                    )
            if route.shadow is not None and route.shadow.pool and route.shadow.pool not in self.pools:
                raise ConfigError(
                    f"models.{model}.shadow.pool",
                    f"unknown pool {route.shadow.pool!r}; expected one of: {', '.join(self.pools)}",
                )

    def with_listen(self, listen: str) -> "GatewayConfig":
        return dataclasses.replace(self, listen=listen)


def config_from_mapping(data: Any) -> GatewayConfig:
    return load_dataclass(GatewayConfig, data)


def read_config_mapping(path: str | os.PathLike) -> Any:
    """The YAML config file as read, before validation (an engine in another process loads it again)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return yaml.safe_load(stream)
    except OSError as error:
        raise ConfigError("", f"cannot read config file {os.fspath(path)!r}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError("", f"{os.fspath(path)} is not valid YAML: {error}") from error


def load_config(path: str | os.PathLike) -> GatewayConfig:
    """Read and validate a YAML config file; ConfigError names the key path of any problem."""
    return config_from_mapping(read_config_mapping(path))


__all__ = ["GatewayConfig", "PoolConfig", "ModelRoute", "load_config", "read_config_mapping", "config_from_mapping", "parse_address"]
