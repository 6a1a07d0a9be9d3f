"""The seam between the gateway's gRPC services and the engine that serves them.

A service is a list of `Method`s whose handlers take and return serialized messages; an engine
(gateway/server/engines/: grpc.aio today) owns the sockets, HTTP/2 and gRPC framing, fills a `Call`
for each call, and turns what a handler raises into the call's status with `status_of`, the one
error→status translation of the gateway. Handlers never see an engine's own objects, so every
service runs unchanged on every engine.

    unary      async def handler(request: bytes, call: Call) -> bytes
    streaming  async def handler(requests: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]
               (an async generator; bidirectional: a reply may go out before the client stops writing)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from gateway.errors import GatewayError, InternalError, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    path: str
    """The full method path, "/inference.GRPCInferenceService/ModelInfer"."""
    streaming: bool
    """False: unary; True: bidirectional (a stream of requests → a stream of responses)."""
    handler: Callable
    gate: object | None = None
    """Unary only: admission of each request message by its size (gateway/pipeline/admission.py
    `Gate`): the engine calls `gate.admit(size)` as soon as it knows the size — before reading
    the rest of the message where it can (envoy: from the length prefix) — and `gate.release(size)`
    when the call ends, however it ends. A refusal (ResourceExhausted) ends the call at once."""


class Call:
    """What a handler may know about its call; the engine fills it.

    An engine may pass `metadata` and `peer` as zero-argument callables, read on first use: most
    handlers never look, and reading them costs on every request with some engines (grpc.aio).
    """

    __slots__ = ("deadline", "_metadata", "_peer", "_headers", "tenant")

    def __init__(self, deadline: float | None = None, metadata=(), peer="", headers=None) -> None:
        self.deadline = deadline
        """Absolute `time.monotonic()` instant from the client's grpc-timeout, or None."""
        self._metadata = metadata
        self._peer = peer
        self._headers = headers  # an engine's {lower-case key bytes: value bytes}, for header()
        self.tenant = None
        """Who is calling, when authentication is on (gateway/server/access.py sets it); else None."""

    @property
    def metadata(self) -> tuple:
        """((key, value), ...): lower-case keys; "-bin" keys' values are bytes."""
        if callable(self._metadata):
            self._metadata = tuple(self._metadata() or ())
        return self._metadata

    def header(self, key: str) -> str | bytes | None:
        """A value of metadata `key` (lower case), or None. With the engine's request headers at
        hand, one dict lookup (authentication reads a header on every call); else a scan."""
        headers = self._headers
        if headers is not None and not key.endswith("-bin"):
            value = headers.get(key.encode("latin-1"))
            return None if value is None else value.decode("latin-1")
        for name, value in self.metadata:
            if name == key:
                return value
        return None

    @property
    def peer(self) -> str:
        if callable(self._peer):
            self._peer = self._peer()
        return self._peer

    def __repr__(self) -> str:
        return f"<Call peer={self.peer!r} deadline={self.deadline} metadata={len(self.metadata)} keys>"


def methods_of(service: str, unary: dict[str, Callable], streaming: dict[str, Callable] | None = None,
               gates: dict[str, object] | None = None) -> list[Method]:
    """The Methods of one service from its handlers by method name (`gates`: unary methods' gates)."""
    gates = gates or {}
    table = [Method(f"/{service}/{name}", False, handler, gates.get(name)) for name, handler in unary.items()]
    table += [Method(f"/{service}/{name}", True, handler) for name, handler in (streaming or {}).items()]
    return table


def parse_request(message_type: type, raw: bytes):
    """The request message in `raw`; a message that does not parse is the client's INVALID_ARGUMENT."""
    try:
        return message_type.FromString(raw)
    except DecodeError as error:
        raise InvalidArgument(f"request is not a valid {message_type.DESCRIPTOR.name}: {error}") from None


#: The longest status message sent: a client's header limit (grpc's default is 8 KiB of metadata)
#: must hold it, or the client sees "Stream removed" instead of the status.
MAX_MESSAGE_CHARS = 1024

#: At most one log line a second per status code for errors with a `detail` (a backend outage
#: fails every request; the log says so, and how many more there were, without a line each).
_DETAIL_LOG_INTERVAL_S = 1.0
_detail_logged: dict[grpc.StatusCode, list] = {}
#: The statuses whose detail is an operator's business (a backend down or failing); a backend's
#: refusal of a client's request is the client's, and not logged.
_LOGGED_CODES = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS))


def _log_detail(error: GatewayError, method: str) -> None:
    now = time.monotonic()
    entry = _detail_logged.setdefault(error.code, [0.0, 0])
    if now - entry[0] < _DETAIL_LOG_INTERVAL_S:
        entry[1] += 1
        return
    more = f" (and {entry[1]} more since the last line)" if entry[1] else ""
    entry[0], entry[1] = now, 0
    log.warning("%s answered %s: %s [%s]%s", method or "a call", error.code.name, error.message, error.detail, more)


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… (message cut at {limit} of {len(message)} characters)"


def status_of(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status a call ends with when its handler raised `error`.

    A GatewayError carries its own; its `detail` (what only an operator may read: backend
    addresses, gRPC's own error text) is logged, never sent. Anything else is a gateway bug: logged
    with its traceback and answered INTERNAL without its text, while the server keeps serving. The
    message sent is bounded (MAX_MESSAGE_CHARS).
    """
    if not isinstance(error, GatewayError):
        log.error("%s failed unexpectedly", method or "a call", exc_info=error)
        # The exception's text may hold anything (addresses, a client's bytes): the log has it.
        return grpc.StatusCode.INTERNAL, f"internal gateway error ({type(error).__name__}); the gateway's log has the details"
    if error.detail and error.code in _LOGGED_CODES:
        _log_detail(error, method)
    return error.code, bounded(error.message)


def trailers_of(error: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata the call ends with besides its status (a GatewayError's `trailers`)."""
    return error.trailers if isinstance(error, GatewayError) else ()
