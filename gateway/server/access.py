"""Authentication at the front door: every Method wrapped so its call says who is calling.

`guarded(methods, guard, admin_services)` returns the table with each handler behind the guard:

    open            grpc.health.v1 (Check, Watch), ServerLive, ServerReady: probes need no credential
    admin           the services named in `admin_services`: a tenant with `admin: true`
    everything else a known credential (UNAUTHENTICATED otherwise); a unary call spends one request
                    of the tenant's rate, a stream spends one per request it carries (inference.py)

The model-level checks (allow-lists, limits) are the inference service's, which knows the model a
request names. Without authentication configured the table is returned as it is: no call pays.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Iterable

from gateway.protocol import INFERENCE_SERVICE
from gateway.security.guard import Guard
from gateway.server.health import SERVICE as HEALTH_SERVICE
from gateway.server.rpc import Call, Method

#: Methods any caller may use: what load balancers and orchestrators probe.
OPEN_METHODS = frozenset((
    f"/{HEALTH_SERVICE}/Check",
    f"/{HEALTH_SERVICE}/Watch",
    f"/{INFERENCE_SERVICE}/ServerLive",
    f"/{INFERENCE_SERVICE}/ServerReady",
))  # fmt: skip


def guarded(methods: Iterable[Method], guard: Guard | None, admin_services: Iterable[str] = ()) -> list[Method]:
    """`methods`, each behind `guard`'s authentication (unchanged when it does not authenticate)."""
    methods = list(methods)
    if guard is None or not guard.authenticates:
        return methods
    admin_prefixes = tuple(f"/{service}/" for service in admin_services)
    table = []
    for method in methods:
        if method.path in OPEN_METHODS:
            table.append(method)
            continue
        admin = method.path.startswith(admin_prefixes)
        wrap = _streaming if method.streaming else _unary
        table.append(Method(method.path, method.streaming, wrap(method.handler, guard, admin), method.gate))
    return table


def _unary(handler: Callable, guard: Guard, admin: bool) -> Callable:
    async def authenticated(request: bytes, call: Call) -> bytes:
        guard.admit_call(call)
        if admin:
            guard.check_admin(call)
        return await handler(request, call)

    return authenticated


def _streaming(handler: Callable, guard: Guard, admin: bool) -> Callable:
    async def authenticated(requests: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
        guard.open_stream(call)
        if admin:
            guard.check_admin(call)
        responses = handler(requests, call)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()  # at once, not when the collector finds it

    return authenticated
