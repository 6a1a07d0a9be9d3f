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
import hashlib
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
from gateway.upstream.config import HealthConfig, OutlierConfig, PoolConfig, UpstreamConfig, parse_address, unix_socket_path


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
        if self.upstream.tls is not None:
            for name, pool in self.pools.items():
                for index, address in enumerate(pool.http_backends):
                    if unix_socket_path(address) is not None:
                        raise ConfigError(
                            f"pools.{name}.http_backends[{index}]",
                            f"a Unix socket ({address!r}) does not leave the node: upstream.tls is for "
                            "backends reached over the network; list host:port here, or drop upstream.tls",
                        )
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


#: What a reload applies live: these sections rebuild the backends and the stages that hold them
#: (new requests go to the new ones, requests in flight finish on the old ones)…
CORE_SECTIONS = ("pools", "models", "upstream", "health", "routing", "batching", "drift")
#: …these server keys take effect at once…
LIVE_SERVER_KEYS = ("grace_s", "name", "config_poll_s")
#: …and everything else waits for a restart (a bound socket, the engine and what it was built with,
#: the exporters, credentials and tenants, workers): a reload keeps its running value and logs that
#: it changed. A section added later is restart-only until it is listed above.


@dataclass(frozen=True)
class ReloadPlan:
    """How a reload from `old` to `new` goes: the config to run (`new` with the restart-only keys
    kept at their running values), the sections applied live, the restart-only keys that changed."""

    config: GatewayConfig
    live: tuple[str, ...]
    restart: tuple[str, ...]

    @property
    def core(self) -> bool:
        """Whether the backends and the stages that hold them are rebuilt."""
        return any(section in CORE_SECTIONS for section in self.live)

    def summary(self) -> str:
        text = f"applied: {', '.join(self.live)}" if self.live else "no change to apply"
        if self.restart:
            text += f"; changed but kept until a restart: {', '.join(self.restart)}"
        return text


def _get(config: GatewayConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def plan_reload(old: GatewayConfig, new: GatewayConfig) -> ReloadPlan:
    restart_sections = [f.name for f in dataclasses.fields(GatewayConfig) if f.name not in (*CORE_SECTIONS, "server")]
    restart_server = [f.name for f in dataclasses.fields(type(old.server)) if f.name not in LIVE_SERVER_KEYS]
    restart = tuple(name for name in restart_sections if getattr(old, name) != getattr(new, name))
    restart += tuple(f"server.{name}" for name in restart_server if getattr(old.server, name) != getattr(new.server, name))
    server = dataclasses.replace(new.server, **{name: getattr(old.server, name) for name in restart_server})
    config = dataclasses.replace(new, server=server, **{name: getattr(old, name) for name in restart_sections})
    live = tuple(section for section in CORE_SECTIONS if getattr(old, section) != getattr(config, section))
    live += tuple(f"server.{key}" for key in LIVE_SERVER_KEYS if getattr(old.server, key) != getattr(server, key))
    return ReloadPlan(config, live, restart)


def parse_config_text(text: str) -> Any:
    """A config sent as text (YAML, of which JSON is a part), before validation."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"the config is not valid YAML: {error}") from error


def file_digest(path: str | os.PathLike) -> bytes | None:
    """The SHA-256 of a file's content (None: unreadable now, e.g. while an editor replaces it)."""
    try:
        with open(path, "rb") as stream:
            return hashlib.sha256(stream.read()).digest()
    except OSError:
        return None


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


__all__ = ["GatewayConfig", "PoolConfig", "ModelRoute", "ReloadPlan", "config_from_mapping", "file_digest", "load_config",
           "parse_address", "parse_config_text", "plan_reload", "read_config_mapping"]
