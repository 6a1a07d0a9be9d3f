"""Config of the upstream stage: pools of Triton backends, how to reach them, how to check them."""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field

from gateway.errors import ConfigError


def parse_address(address: str, path: str) -> tuple[str, int]:
    """Split 'host:port' (or '[v6]:port'), raising ConfigError naming `path` if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


UNIX_PREFIX = "unix:"
#: Longest Unix socket path the kernel takes (sun_path is 108 bytes with its terminating NUL).
MAX_UNIX_PATH_BYTES = 107


def unix_socket_path(address: str) -> str | None:
    """The socket path of a `unix:/path` address, or None for host:port."""
    return address[len(UNIX_PREFIX):] if address.startswith(UNIX_PREFIX) else None


def validate_http_address(address: str, path: str) -> None:
    """host:port, or `unix:/absolute/path` for a Triton on the same node (its HTTP endpoint on a
    Unix socket, `tritonserver --http-address=unix:PATH`)."""
    socket_path = unix_socket_path(address)
    if socket_path is None:
        parse_address(address, path)
    elif not socket_path.startswith("/"):
        raise ConfigError(path, f"expected unix:/absolute/path/to/socket, got {address!r}")
    elif len(socket_path.encode()) > MAX_UNIX_PATH_BYTES:
        raise ConfigError(path, f"a Unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes, got "
                                f"{len(socket_path.encode())}: {socket_path!r}")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def derived_http_address(address: str, offset: int) -> str:
    """The HTTP/REST address of the Triton whose gRPC address is `address`: same host, gRPC port
    plus `offset` (upstream.http_port_offset; -1 is Triton's own HTTP 8000 beside gRPC 8001)."""
    host, port = parse_address(address, "")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + offset}"


@dataclass(frozen=True)
class PoolConfig:
    """A named group of interchangeable Triton backends (a GPU node group, a CPU node group, …),
    listed (`backends`), discovered by DNS (`dns`), or both."""

    backends: tuple[str, ...] = ()
    """gRPC address (host:port) of every Triton server in the pool."""
    http_backends: tuple[str, ...] = ()
    """HTTP/REST address of the same servers, in the order of `backends`; used when
    `upstream.transport` is `http`: host:port, or `unix:/path` for a Triton on the gateway's own
    node whose HTTP endpoint listens on that Unix socket (`--http-address=unix:/path`): reachable
    from that node alone, by who may open the file, so clients cannot go around the gateway to
    Triton's HTTP port (its CPU per request is the same as over loopback TCP: benchmarks/RESULTS.md,
    "Sixth session"). Empty (the default): each server's HTTP port is its gRPC port plus
    `upstream.http_port_offset` (-1: Triton's own defaults, HTTP 8000 beside gRPC 8001)."""
    dns: str | None = None
    """`name:port`: every address the name resolves to (A records; AAAA when it has none) is a
    backend at that gRPC port, e.g. a Kubernetes headless Service,
    `triton-gpu.models.svc.cluster.local:8001`. Re-resolved every `upstream.discovery.interval_s`:
    new addresses join the pool (after their first good health check), vanished ones drain
    (gateway/upstream/discovery.py). Their HTTP port is the gRPC port plus
    `upstream.http_port_offset` (Triton's 8000 beside 8001 by default)."""
    cost: float = 1.0
    """What a request served by this pool costs, relative to the other pools (e.g. its cost per hour
    divided by the requests per hour it serves). A model's pools are tried cheapest first (ties keep
    the model's own order); with a latency objective, the cheapest pool predicted to meet it wins."""

    def validate(self, path: str) -> None:
        if not 0 <= self.cost < float("inf"):
            raise ConfigError(f"{path}.cost", f"expected a cost >= 0, got {self.cost}")
        if not self.backends and self.dns is None:
            raise ConfigError(f"{path}.backends", "expected at least one backend address, or `dns: name:port`")
        if self.dns is not None:
            host, _ = parse_address(self.dns, f"{path}.dns")
            if _is_ip_address(host):
                raise ConfigError(f"{path}.dns", f"expected a DNS name, got the address {host!r}: list it in `backends`")
            if not all(0 < len(label) < 64 for label in host.rstrip(".").split(".")):
                raise ConfigError(f"{path}.dns", f"expected a DNS name and a port (name:port), got {self.dns!r}")
        for index, address in enumerate(self.backends):
            parse_address(address, f"{path}.backends[{index}]")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"{path}.backends", "the same backend address is listed twice")
        if self.http_backends:
            if len(self.http_backends) != len(self.backends):
                raise ConfigError(
                    f"{path}.http_backends",
                    f"expected one HTTP address per backend ({len(self.backends)}, in the order of "
                    f"`backends`), got {len(self.http_backends)}",
                )
            for index, address in enumerate(self.http_backends):
                validate_http_address(address, f"{path}.http_backends[{index}]")

    def http_address(self, index: int, offset: int) -> str:
        """The HTTP/REST address of backend `index`: listed, or derived from its gRPC port."""
        if self.http_backends:
            return self.http_backends[index]
        return derived_http_address(self.backends[index], offset)


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
class UpstreamTls:
    """TLS toward every backend: gRPC (inference streams, health checks, metadata) and HTTP.

        upstream:
          tls:
            ca_file: /etc/tensorgate/backend-ca.crt   # verify backends against this CA
            cert_file: /etc/tensorgate/client.crt     # optional: the gateway's client certificate
            key_file: /etc/tensorgate/client.key      #   (backends that require mutual TLS)
            server_name: triton.internal              # optional: the name backend certificates carry
    """

    ca_file: str | None = None
    """PEM CA bundle the backends' certificates are verified against; None: the system's CAs."""
    cert_file: str | None = None
    """PEM client certificate chain the gateway presents to backends (mutual TLS)."""
    key_file: str | None = None
    """PEM private key of cert_file."""
    server_name: str | None = None
    """The name backend certificates are verified against (and sent as SNI); None: each backend's
    host as written in `backends`."""

    def validate(self, path: str) -> None:
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value is not None and not os.access(value, os.R_OK):
                raise ConfigError(f"{path}.{key}", f"cannot read file {value!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(f"{path}.cert_file", "expected cert_file and key_file together (or neither)")
        try:
            self.ssl_context()  # a bad PEM or a key of another certificate: a config error, at load
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(path, f"cannot load the TLS files: {error}") from None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate chain) as PEM bytes, as grpc.ssl_channel_credentials takes them."""

        def contents(name: str | None) -> bytes | None:
            if name is None:
                return None
            with open(name, "rb") as stream:
                return stream.read()

        return contents(self.ca_file), contents(self.key_file), contents(self.cert_file)

    def ssl_context(self) -> ssl.SSLContext:
        """The client SSL context of the HTTP upstream: verifies the backend, may present ours."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])
        return context


@dataclass(frozen=True)
class DiscoveryConfig:
    """How pools with `dns:` are resolved (gateway/upstream/discovery.py)."""

    interval_s: float = 5.0
    """Seconds between two resolutions of a pool's name (CoreDNS answers for Kubernetes Services
    with a 5 s TTL by default)."""
    timeout_s: float = 2.0
    """A resolution not answered in this time keeps the pool as it is."""
    nameservers: tuple[str, ...] = ()
    """DNS servers to ask (`host` or `host:port`), in order; empty (the default): the system's,
    from /etc/resolv.conf, with its search domains (so `triton-gpu.models.svc` works in a pod)."""
    drain_s: float = 30.0
    """A backend whose address left DNS gets no new requests; requests in flight on it get this
    long to finish before its connections close."""

    def validate(self, path: str) -> None:
        if self.interval_s <= 0:
            raise ConfigError(f"{path}.interval_s", "expected a positive number of seconds")
        if self.timeout_s <= 0:
            raise ConfigError(f"{path}.timeout_s", "expected a positive number of seconds")
        if self.drain_s < 0:
            raise ConfigError(f"{path}.drain_s", "expected zero or more seconds")
        for index, server in enumerate(self.nameservers):
            nameserver_address(server, f"{path}.nameservers[{index}]")


def nameserver_address(server: str, path: str) -> tuple[str, int]:
    """(host, port) of a nameserver written `host`, `host:port` or `[v6]:port` (port 53 by default)."""
    if server.count(":") == 1 or server.startswith("["):
        return parse_address(server, path)
    if not server:
        raise ConfigError(path, "expected a nameserver address (host or host:port)")
    return server, 53


TRANSPORTS = ("grpc-stream", "http")


@dataclass(frozen=True)
class UpstreamConfig:
    """How the gateway talks to each backend.

    `transport` picks how inference requests travel:
    - `http` (default): Triton's HTTP/REST endpoint with the binary tensor data extension, over a
      bounded pool of keep-alive HTTP/1.1 connections per backend (gateway/upstream/http.py,
      rest.py); about half the gateway's CPU per request of the stream (benchmarks/RESULTS.md,
      "Upstream transports"). Each backend then needs its HTTP address too:
      `pools.<name>.http_backends`, or its gRPC port plus `http_port_offset` (-1 by default:
      Triton's own HTTP 8000 beside gRPC 8001). A wrong HTTP address shows in the health checks,
      which then also ask the HTTP endpoint whether it is ready;
    - `grpc-stream`: every request rides a long-lived ModelStreamInfer stream per backend
      (gateway/upstream/stream.py).
    Either way, decoupled models and requests of a sequence (a `sequence_id`) ride the stream, and
    health checks and model metadata use gRPC calls.
    """

    transport: str = "http"
    """`http` (the default) or `grpc-stream` (see above)."""
    streams_per_backend: int = 1
    """Long-lived ModelStreamInfer streams multiplexed per backend; requests spread over them (every
    step of a sequence on one of them). Decoupled requests ride as many streams again, theirs alone."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest message sent to or received from a backend."""
    http_connections_per_backend: int = 64
    """`http`: most HTTP connections open to one backend (one request in flight on each); further
    requests wait for a free one, first come first served."""
    http_port_offset: int = -1
    """`http`: a backend's HTTP port is its gRPC port plus this, unless its pool lists
    `http_backends`."""
    http_connect_timeout_s: float = 2.0
    """`http`: a connection not established in this time fails the request with UNAVAILABLE."""
    tls: UpstreamTls | None = None
    """TLS toward the backends (both transports, health checks and metadata too); None: plaintext."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    """How pools with `dns:` find their backends (interval, nameservers, drain time)."""

    def validate(self, path: str) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"{path}.transport", f"expected one of: {', '.join(TRANSPORTS)}; got {self.transport!r}")
        if not 1 <= self.streams_per_backend <= 64:
            raise ConfigError(f"{path}.streams_per_backend", "expected an integer from 1 to 64")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"{path}.max_message_bytes", "expected at least 1024 bytes")
        if not 1 <= self.http_connections_per_backend <= 4096:
            raise ConfigError(f"{path}.http_connections_per_backend", "expected an integer from 1 to 4096")
        if not -65535 < self.http_port_offset < 65535:
            raise ConfigError(f"{path}.http_port_offset", "expected an integer port offset")
        if self.http_connect_timeout_s <= 0:
            raise ConfigError(f"{path}.http_connect_timeout_s", "expected a positive number of seconds")


@dataclass(frozen=True)
class OutlierConfig:
    """`outlier:` — passive outlier ejection (gateway/upstream/outlier.py), beside the active health
    checks: a backend whose requests fail or stall leaves rotation for a while, longer each time.

    A failure here is one that says the backend could not answer: UNAVAILABLE (refused or broken
    connection, Triton's full queue) or DEADLINE_EXCEEDED at the backend. A model's own refusal
    (INVALID_ARGUMENT, a model's INTERNAL error) is an answer, not a failure of the backend. A
    stall is requests outstanding on a backend with none answered for `stall_after_s` while an
    active health check failed: a hung (SIGSTOPped, wedged) backend, which never answers, so never
    fails either. (A backend busy with a long request answers its health checks: not a stall.)

    When a backend is ejected, the requests pending on it are failed over: they end with a
    retryable UNAVAILABLE, which the dispatcher resends to another backend while their deadline
    leaves room (routing's retry rules). Re-admission: an ejection lasts `base_ejection_s` ×
    2^(ejections in a row − 1), at most `max_ejection_s`; after it the backend returns on its next
    successful active health check. At most `max_ejected_percent` of a pool's backends (at least
    one) are ejected at once.
    """

    enabled: bool = True
    consecutive_failures: int = 5
    """Failures in a row (no success between) that eject a backend."""
    stall_after_s: float = 0.5
    """A backend with requests outstanding, no answer for this long and a failed health check
    meanwhile is ejected (so with the default health checks a hung backend leaves rotation
    within interval_s + timeout_s: 2 s)."""
    base_ejection_s: float = 1.0
    """The first ejection's length; each further one in a row doubles it."""
    max_ejection_s: float = 30.0
    """The longest an ejection lasts; a backend that stays in rotation this long starts again
    from base_ejection_s."""
    max_ejected_percent: int = 50
    """Most backends of a pool ejected at once, in percent of the pool (at least one)."""
    interval_s: float = 0.1
    """How often stalls and ended ejections are looked for."""

    def validate(self, path: str) -> None:
        if self.consecutive_failures < 1:
            raise ConfigError(f"{path}.consecutive_failures", "expected at least 1")
        for name in ("stall_after_s", "base_ejection_s", "max_ejection_s", "interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}", "expected a positive number of seconds")
        if self.max_ejection_s < self.base_ejection_s:
            raise ConfigError(f"{path}.max_ejection_s", f"expected at least base_ejection_s ({self.base_ejection_s:g})")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ConfigError(f"{path}.max_ejected_percent", "expected a percentage from 0 to 100")
