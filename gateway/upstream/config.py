"""Config of the upstream stage: pools of Triton backends, how to reach them, how to check them."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError


def parse_address(address: str, path: str) -> tuple[str, int]:
    """Split 'host:port' (or '[v6]:port'), raising ConfigError naming `path` if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class PoolConfig:
    """A named group of interchangeable Triton backends (a GPU node group, a CPU node group, …)."""

    backends: tuple[str, ...]
    """gRPC address (host:port) of every Triton server in the pool."""

    def validate(self, path: str) -> None:
        if not self.backends:
            raise ConfigError(f"{path}.backends", "expected at least one backend address")
        for index, address in enumerate(self.backends):
            parse_address(address, f"{path}.backends[{index}]")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"{path}.backends", "the same backend address is listed twice")


@dataclass(frozen=True)
class HealthConfig:
    """Active health checking of backends (ServerReady + the ready models of RepositoryIndex)."""

    interval_s: float = 1.0
    """Seconds between two checks of one backend."""
    timeout_s: float = 1.0
    """A check that takes longer counts as failed."""
    unhealthy_after: int = 2
    """Consecutive failed checks before a healthy backend is taken out of rotation (one slow
    check on a busy machine is not an outage). A broken connection ejects it at once."""

    def validate(self, path: str) -> None:
        if self.unhealthy_after < 1:
            raise ConfigError(f"{path}.unhealthy_after", "expected at least 1")
        if self.interval_s <= 0:
            raise ConfigError(f"{path}.interval_s", "expected a positive number of seconds")
        if self.timeout_s <= 0:
            raise ConfigError(f"{path}.timeout_s", "expected a positive number of seconds")


@dataclass(frozen=True)
class UpstreamConfig:
    """How the gateway talks to each backend."""

    streams_per_backend: int = 1
    """Long-lived ModelStreamInfer streams multiplexed per backend; requests spread over them."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest message sent to or received from a backend."""

    def validate(self, path: str) -> None:
        if not 1 <= self.streams_per_backend <= 64:
            raise ConfigError(f"{path}.streams_per_backend", "expected an integer from 1 to 64")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"{path}.max_message_bytes", "expected at least 1024 bytes")
