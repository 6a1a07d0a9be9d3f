"""Config of the front door: where the gateway listens and what it accepts."""

from __future__ import annotations

import importlib.util
import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any

ENGINES = ("auto", "envoy", "h2", "grpcio")
HTTP2_CODECS = ("nghttp2", "oghttp2")  # the envoy engine's HTTP/2 codecs (EnvoyOptions.http2_codec)
ENVOY_STATS = ("needed", "all")  # what Envoy's own statistics keep (EnvoyOptions.stats)

from gateway.errors import ConfigError


def check_readable(path: str, key: str) -> None:
    """ConfigError naming `key` unless `path` is a file this process can read."""
    if not os.path.isfile(path):
        raise ConfigError(key, f"no such file: {path!r}")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"cannot read {path!r} (permissions)")


@dataclass(frozen=True)
class ServerTls:
    """TLS on the front door: the gateway's certificate, and optionally mutual TLS.

        server:
          tls:
            cert_file: /etc/tensorgate/tls.crt        # PEM, the chain: leaf first
            key_file: /etc/tensorgate/tls.key         # PEM private key
            client_ca_file: /etc/tensorgate/ca.crt    # optional: mutual TLS
    """

    cert_file: str
    """PEM certificate chain the gateway presents."""
    key_file: str
    """PEM private key of that certificate (read by the engine; never logged)."""
    client_ca_file: str | None = None
    """PEM CA bundle: with it, clients must present a certificate issued by one of these CAs
    (mutual TLS); a client without one, or with one from another CA, fails the handshake."""
    require_client_certificate: bool = True
    """With client_ca_file: false lets clients without a certificate in (those that present one
    must still present a valid one)."""

    def validate(self, path: str) -> None:
        check_readable(self.cert_file, f"{path}.cert_file")
        check_readable(self.key_file, f"{path}.key_file")
        # Loaded once here so that a bad PEM or a key of another certificate is a config error
        # naming the key, not an engine that fails to start (ssl's messages never show key material).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(f"{path}.key_file", f"not a PEM certificate chain and its private key: {error}") from None
        if self.client_ca_file is not None:
            check_readable(self.client_ca_file, f"{path}.client_ca_file")
            try:
                context.load_verify_locations(self.client_ca_file)
            except ssl.SSLError as error:
                raise ConfigError(f"{path}.client_ca_file", f"not a PEM CA bundle: {error}") from None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """The h2 engine's TLS: this certificate, TLS 1.2 or later (RFC 9113), and client
        certificates verified against client_ca_file when it is given (the engine adds ALPN h2)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_OPTIONAL
        return context


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
    """What serves the front door: `h2` (HTTP/2 by libnghttp2 on the gateway's own event loop, no
    thread hand-overs; the echo's CPU a request ~0.1× grpc.aio's, benchmarks/RESULTS.md), `envoy`
    (Envoy's HTTP/2 through pyvoy, the gateway's Python inside the Envoy process; ~0.3×), `grpcio`
    (grpc.aio, in the gateway's own process), or `auto`: h2 where its extension is built (it links
    libnghttp2), else envoy where pyvoy is installed (Python 3.11+), else grpcio."""
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
    tls: ServerTls | None = None
    """TLS (and mutual TLS) on the front door; None: plaintext (loopback or behind a TLS proxy)."""
    max_concurrent_streams: int = 1024
    """HTTP/2 streams one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS,
    both engines): bounds what one connection can make the gateway hold, against stream floods and
    rapid reset. Clients queue calls beyond it (gRPC clients wait for a free stream; nothing fails).
    Envoy also closes a connection whose streams are mostly reset before they are answered (its
    premature-reset protection, on by default); grpc.aio has its own."""

    http2_stream_window_bytes: int = 1024 * 1024
    """envoy engine: the HTTP/2 flow-control window of a call (Envoy's default, 256 MiB, lets a
    client push a whole large request into Envoy's memory before the gateway admits or refuses
    it). What Envoy holds of requests not yet read is bounded by this per call and by
    `http2_connection_window_bytes` per connection."""
    http2_connection_window_bytes: int = 2 * 1024 * 1024
    """envoy engine: the HTTP/2 flow-control window of a connection (Envoy's default: 256 MiB)."""
    http2_codec: str = "nghttp2"
    """envoy engine: Envoy's HTTP/2 codec, `nghttp2` or `oghttp2` (Envoy's own default). nghttp2
    cost Envoy's C++ 4–7 µs less per call in this project's measurements (benchmarks/RESULTS.md)."""
    envoy_stats: str = "needed"
    """envoy engine: Envoy's own statistics. `needed` keeps only the drain's count of requests in
    flight and the connections closed by Envoy's rapid-reset protection; `all` keeps Envoy's whole
    set, readable at its admin endpoint, for debugging Envoy itself. The gateway's metrics come from
    its telemetry either way; Envoy's full set cost 2–4 % more CPU a request here
    (benchmarks/RESULTS.md, "Seventh session")."""
    gc_freeze: bool = True
    """Freeze what start-up built out of the cyclic garbage collector's reach (`gc.freeze()`), in
    the serving process only (gateway/server/gc_policy.py): later collections skip it."""
    gc_threshold: int = 700
    """The collector's young-generation threshold in the serving process (CPython's own, 700, by
    default). Higher trades memory for CPU: 20,000 took the collector out of perf's profile of the
    envoy engine at 64 in flight (1 % of its samples with the freeze alone), but under error-heavy
    traffic (tests/test_fuzz.py) the process grew twice as much and kept growing, where at 700 it
    levels off."""
    cpus: tuple[int, ...] | None = None
    """CPUs (as numbered by the OS) the serving process runs on, every thread of it and what it
    starts (Envoy) included; None: wherever the OS puts it. With `workers`, worker k gets
    `cpus[k % len(cpus)]` alone, and `workers: auto` is one per listed CPU. The envoy engine hands
    each request between its threads ~8 times, and on one CPU those wake-ups are cheaper: 19 % less
    CPU a request at 800 req/s here, ~10 % at full load (gateway/server/cpu_pinning.py). Leave the
    CPUs Triton and the load need to them."""
    workers: Any = 1
    """Worker processes serving the one listen port (SO_REUSEPORT; Envoy's reuse_port), supervised
    by a parent that restarts a dead one, drains them all on SIGTERM, and merges their metrics,
    drift windows, statistics and admin answers (gateway/workers/): an integer, or `auto` for one
    per core this process may run on (per CPU of `cpus` when set). 1: the single process of old,
    with no parent. Clients spread over workers by connection (the kernel picks a worker per TCP
    connection): see README."""
    workers_report_s: float = 0.25
    """With several workers: how often each ships its counters and drift rows to the parent, so
    how stale the merged metrics, ModelStatistics and admin answers may be (the worker that answers
    adds its own live counters)."""

    def resolved_workers(self) -> int:
        """The number of worker processes: `workers`, or `auto_workers()`."""
        if self.workers == "auto":
            return self.auto_workers()
        return int(self.workers)

    def auto_workers(self) -> int:
        """What `workers: auto` (or `--workers auto`) means: one per CPU of `cpus` when set, else one
        per core this process may run on."""
        return len(self.cpus) if self.cpus is not None else len(os.sched_getaffinity(0))

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        if importlib.util.find_spec("gateway.ext.h2server") is not None:
            return "h2"
        available = sys.version_info >= (3, 11) and importlib.util.find_spec("pyvoy") is not None
        return "envoy" if available else "grpcio"

    def validate(self, path: str) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"{path}.engine", f"expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "envoy" and importlib.util.find_spec("pyvoy") is None:
            raise ConfigError(f"{path}.engine", "envoy needs the pyvoy package (Python 3.11+); use grpcio")
        if self.engine == "h2" and importlib.util.find_spec("gateway.ext.h2server") is None:
            raise ConfigError(f"{path}.engine", "h2 needs its extension, built only where libnghttp2 "
                              "(libnghttp2.so.14; Debian: libnghttp2-14) is installed; install it and "
                              "run make compile, or use envoy or grpcio")
        if self.http2_codec not in HTTP2_CODECS:
            raise ConfigError(f"{path}.http2_codec", f"expected one of {', '.join(HTTP2_CODECS)}, got {self.http2_codec!r}")
        if self.envoy_stats not in ENVOY_STATS:
            raise ConfigError(f"{path}.envoy_stats", f"expected one of {', '.join(ENVOY_STATS)}, got {self.envoy_stats!r}")
        if self.envoy_threads is not None and self.envoy_threads < 1:
            raise ConfigError(f"{path}.envoy_threads", "expected at least 1 thread")
        auto = self.workers == "auto"
        if not auto and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"{path}.workers", f"expected a number of processes (1 or more) or auto, got {self.workers!r}")
        if not self.workers_report_s > 0:
            raise ConfigError(f"{path}.workers_report_s", "expected a positive number of seconds")
        if not self.name.strip():
            raise ConfigError(f"{path}.name", "expected a non-empty server name")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"{path}.max_message_bytes", "expected at least 1024 bytes")
        if self.max_pending_calls < 1:
            raise ConfigError(f"{path}.max_pending_calls", "expected at least 1 call")
        if self.config_poll_s < 0:
            raise ConfigError(f"{path}.config_poll_s", "expected zero (no watching) or more seconds")
        for name in ("http2_stream_window_bytes", "http2_connection_window_bytes"):
            if not 65535 <= getattr(self, name) <= 2**31 - 1:
                raise ConfigError(f"{path}.{name}", "expected 65535 to 2147483647 bytes (HTTP/2's range)")
        if not 1 <= self.max_concurrent_streams <= 2**31 - 1:
            raise ConfigError(f"{path}.max_concurrent_streams", "expected an integer from 1 to 2147483647")
        if self.grace_s < 0:
            raise ConfigError(f"{path}.grace_s", "expected zero or more seconds")
        # Whether this machine has them is checked where the process pins itself (cpu_pinning.check):
        # a pinned process reads this config again (Envoy's), and may then run on one CPU of them.
        if self.cpus is not None and (not self.cpus or len(set(self.cpus)) != len(self.cpus)
                                      or any(cpu < 0 for cpu in self.cpus)):
            raise ConfigError(f"{path}.cpus", f"expected a list of distinct CPU numbers, got {list(self.cpus)!r}")
        if isinstance(self.gc_threshold, bool) or not isinstance(self.gc_threshold, int) or self.gc_threshold < 100:
            raise ConfigError(f"{path}.gc_threshold", f"expected an integer of at least 100 (CPython's default: 700), "
                              f"got {self.gc_threshold!r}")
