"""Config of who may call the gateway (`auth`) and what one request may hold (`limits`).

    auth:                                  # off when absent: every caller is let in, nothing is checked
      api_key_header: x-api-key
      tenants:
        team-a:
          tokens: [{env: TEAM_A_TOKEN}]    # sent as `authorization: Bearer <token>`
          api_keys: [{file: /run/secrets/team-a-keys}]   # sent in the api_key_header
          models: [simple_scale, resnet]   # or ["*"]: every model
          rate: {requests_per_s: 100, burst: 200}
          admin: false                     # may call tensorgate.admin.v1.*
    limits:                                # each off when absent
      max_tensors: 64
      max_bytes_element_bytes: 1048576
      models:
        resnet: {max_message_bytes: 8388608}

Secrets never appear in the config itself: only where to read them (a file or an environment
variable), read once when the gateway is built (gateway/security/secrets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ConfigError

ALL_MODELS = "*"


@dataclass(frozen=True)
class Secret:
    """Where one or more credentials are read from: exactly one of `file` and `env`."""

    file: str | None = None
    """A file holding credentials, one per line (blank lines and lines starting with # are skipped):
    several lines let keys rotate without a gap."""
    env: str | None = None
    """An environment variable holding one credential."""

    def validate(self, path: str) -> None:
        if (self.file is None) == (self.env is None):
            raise ConfigError(path, "expected exactly one of `file` or `env` (where the credential is read from)")
        if self.env is not None and not self.env.strip():
            raise ConfigError(f"{path}.env", "expected the name of an environment variable")

    def where(self) -> str:
        """Where the credential lives, for messages (never the credential itself)."""
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `requests_per_s` on average, bursts of up to `burst` requests."""

    requests_per_s: float
    """Tokens added per second; each call (each request of a ModelStreamInfer stream) takes one."""
    burst: int | None = None
    """The bucket's size; None: one second's worth (at least 1)."""

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, self.requests_per_s)

    def validate(self, path: str) -> None:
        if self.requests_per_s <= 0:
            raise ConfigError(f"{path}.requests_per_s", "expected a positive rate")
        if self.burst is not None and self.burst < 1:
            raise ConfigError(f"{path}.burst", "expected at least 1 request")


@dataclass(frozen=True)
class TenantConfig:
    """One tenant: its credentials, the models it may use, its rate."""

    models: tuple[str, ...]
    """Model names this tenant may use (infer, metadata, config, statistics, readiness, the
    repository index); "*" for every model. Any other model is PERMISSION_DENIED, whether or not
    it exists, so a tenant does not learn of models it may not use."""
    tokens: tuple[Secret, ...] = ()
    """Bearer tokens: the client sends `authorization: Bearer <token>`."""
    api_keys: tuple[Secret, ...] = ()
    """API keys: the client sends `<auth.api_key_header>: <key>`."""
    rate: RateLimit | None = None
    """Per-tenant rate limit (per gateway process); None: unlimited. Over it: RESOURCE_EXHAUSTED with
    `grpc-retry-pushback-ms`."""
    admin: bool = False
    """May call the admin services (tensorgate.admin.v1.*: the live snapshot, drift references)."""

    def validate(self, path: str) -> None:
        if not self.tokens and not self.api_keys:
            raise ConfigError(path, "expected at least one of `tokens` or `api_keys`")
        if not self.models:
            raise ConfigError(f"{path}.models", 'expected model names, or ["*"] for every model')


@dataclass(frozen=True)
class AuthConfig:
    """Authentication (bearer tokens, API keys) mapped to tenants; per-tenant model allow-lists and
    rates. Health (grpc.health.v1, ServerLive, ServerReady) stays open for probes."""

    tenants: dict[str, TenantConfig]
    api_key_header: str = "x-api-key"
    """The metadata key that carries an API key (lower case)."""

    def validate(self, path: str) -> None:
        if not self.tenants:
            raise ConfigError(f"{path}.tenants", "expected at least one tenant")
        header = self.api_key_header
        if not header or header != header.lower() or header.startswith(("grpc-", ":")) or header.endswith("-bin"):
            raise ConfigError(f"{path}.api_key_header",
                              f"expected a lower-case ASCII metadata key, not grpc-*, :* or *-bin; got {header!r}")
        if header == "authorization":
            raise ConfigError(f"{path}.api_key_header", "authorization carries bearer tokens; pick another key")


@dataclass(frozen=True)
class ModelLimits:
    """Limits of one model, tighter than the gateway's own."""

    max_message_bytes: int | None = None
    """Largest request message for this model (the front door's own limit is server.max_message_bytes)."""

    def validate(self, path: str) -> None:
        if self.max_message_bytes is not None and self.max_message_bytes < 1:
            raise ConfigError(f"{path}.max_message_bytes", "expected a positive number of bytes")


@dataclass(frozen=True)
class LimitsConfig:
    """What one inference request may hold, checked at the front door before anything else."""

    max_tensors: int | None = None
    """Most tensors in one request: inputs plus requested outputs. Over it: INVALID_ARGUMENT."""
    max_bytes_element_bytes: int | None = None
    """Longest element of a BYTES input. Over it: INVALID_ARGUMENT."""
    models: dict[str, ModelLimits] = field(default_factory=dict)
    """Per-model limits by model name. Over max_message_bytes: RESOURCE_EXHAUSTED."""

    @property
    def enabled(self) -> bool:
        return (self.max_tensors is not None or self.max_bytes_element_bytes is not None
                or any(limit.max_message_bytes is not None for limit in self.models.values()))

    def validate(self, path: str) -> None:
        if self.max_tensors is not None and self.max_tensors < 1:
            raise ConfigError(f"{path}.max_tensors", "expected at least 1 tensor")
        if self.max_bytes_element_bytes is not None and self.max_bytes_element_bytes < 1:
            raise ConfigError(f"{path}.max_bytes_element_bytes", "expected a positive number of bytes")
