"""The gateway's error tree; every class maps to the gRPC status a client can act on.

    GatewayError                      base; carries `code` (grpc.StatusCode), a message and `trailers`
    ├── InvalidArgument               bad tensor, shape, datatype, byte size, parameters
    ├── NotFound                      unknown model or version
    ├── Unavailable                   no healthy backend for the model, backend connection lost
    │   └── Abandoned                 the backend was ejected while the request was pending on it
    ├── ResourceExhausted             shed (limits on requests and bytes held), queue full, message
    │   │                             over the size limit; may carry `grpc-retry-pushback-ms`
    │   └── RateLimited               a tenant over its rate; trailers say when to retry
    ├── DeadlineExceeded              the client's deadline ran out at the gateway
    ├── Unimplemented                 an API that cannot cross the gateway (shared memory)
    ├── PermissionDenied              an API the gateway refuses on purpose (repository control), or
    │                                 a model the caller's tenant may not use
    ├── Unauthenticated               no credential, or one the gateway does not know
    ├── FailedPrecondition            an admin action the state forbids (a rollout already running)
    ├── BackendError                  a status reported by a Triton backend, passed through
    └── InternalError                 a gateway bug: INTERNAL, never a backend's fault

    ConfigError (ValueError)          invalid configuration; names the key path

Errors are raised as these classes inside the gateway and translated to a gRPC status only at the
front door (gateway/server/rpc.py `status_of`), the way httpx translates only at layer boundaries.

A message is for the client: what was wrong and what to do, bounded in length. What only an
operator may know (a backend's address, gRPC's or the socket's own error text) goes in `detail`,
which `status_of` logs and never sends. A string the client sent is quoted through `shown`, so a
1 MB model name comes back as its first 128 characters and its length.
"""

from __future__ import annotations

import grpc


#: The longest client string a message quotes in full (`shown`).
SHOWN_CHARS = 128


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """A string the client sent, fit to quote in a message: whole up to `limit` characters, else its
    first `limit` characters, an ellipsis and its length."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


#: What a client is told when its backend could not be reached or its connection broke: UNAVAILABLE,
#: which it may retry (the address and the transport's own text go to the log, not to the client).
BACKEND_UNAVAILABLE = "the backend serving this model is unavailable (connection failed or lost); retry the request"


class GatewayError(Exception):
    """An error that ends one request with a gRPC status.

    `message` goes to the client; `detail` (optional) only to the gateway's log.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailers: tuple[tuple[str, str], ...] = ()
    """Trailing metadata the call ends with besides its status (e.g. grpc-retry-pushback-ms)."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code.name}: {self.message}>"

    def for_log(self) -> str:
        """The message with its detail: for the gateway's log and its admin state, not for clients."""
        return f"{self.message} [{self.detail}]" if self.detail else self.message


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class Abandoned(Unavailable):
    """A request pending on a backend that was ejected (hung or failing): it is failed over to
    another backend while its deadline leaves room, outside the retry budget (see routing)."""


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, pushback_ms: int | None = None) -> None:
        super().__init__(message)
        if pushback_ms is not None:
            # gRPC's retry pushback (A6): a client's retry policy waits this long before trying again.
            self.trailers = (("grpc-retry-pushback-ms", str(int(pushback_ms))),)


class RateLimited(ResourceExhausted):
    """Over a rate limit: the trailer `grpc-retry-pushback-ms` says when a retry may succeed
    (gRPC's retry policy honours it; other clients can read it)."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class BackendError(GatewayError):
    """A failure reported by a Triton backend; its status code is passed through to the client."""

    def __init__(self, code: grpc.StatusCode, message: str, backend: str = "", *, detail: str = "") -> None:
        super().__init__(message, detail=detail or (f"backend {backend}" if backend else ""))
        self.code = code
        self.backend = backend


class InternalError(GatewayError):
    """A bug in the gateway itself (an unexpected exception), reported as INTERNAL."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(ValueError):
    """Invalid configuration. `path` is the dotted key path of the offending value."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '<root>'}: {message}")
        self.path = path
        self.reason = message
