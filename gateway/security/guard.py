"""The front door's checks on who calls and what they send: one object the server consults.

    admit_call(call)            authenticate a unary call (sets call.tenant) and spend from its rate
    open_stream(call)           authenticate a stream (its requests spend one by one)
    check_infer(call, request, size, spend)
                                the tenant may use the model; the request is within the limits
    may_use(call, model)        for answers that list models (statistics, repository index)

A Guard exists only when `auth` or `limits` is configured; without one the server adds no work to
any call. With auth on, a call costs a digest, a dict lookup and a token-bucket update.
"""

from __future__ import annotations

from gateway.errors import PermissionDenied
from gateway.security.config import AuthConfig, LimitsConfig
from gateway.security.limits import RequestLimits
from gateway.security.tenants import TenantDirectory


class Guard:
    def __init__(self, auth: AuthConfig | None, limits: LimitsConfig | None) -> None:
        self.directory = None if auth is None else TenantDirectory(auth)
        self.limits = RequestLimits(limits) if limits is not None and limits.enabled else None

    def __repr__(self) -> str:
        return f"<Guard {self.directory!r} {self.limits!r}>"

    @classmethod
    def from_config(cls, auth: AuthConfig | None, limits: LimitsConfig | None) -> "Guard | None":
        """A Guard when there is anything to check, else None (and the server checks nothing)."""
        if auth is None and (limits is None or not limits.enabled):
            return None
        return cls(auth, limits)

    @property
    def authenticates(self) -> bool:
        return self.directory is not None

    def admit_call(self, call) -> None:
        tenant = call.tenant = self.directory.authenticate(call)
        tenant.spend()

    def open_stream(self, call) -> None:
        call.tenant = self.directory.authenticate(call)

    def check_admin(self, call) -> None:
        if not call.tenant.admin:
            raise PermissionDenied(f"tenant '{call.tenant.name}' may not call the admin services")

    def check_model(self, call, model: str) -> None:
        tenant = call.tenant
        if tenant is not None:
            tenant.check_model(model)

    def check_infer(self, call, request, size: int, spend: bool) -> None:
        tenant = call.tenant
        if tenant is not None:
            if spend:
                tenant.spend()
            tenant.check_model(request.model_name)
        if self.limits is not None:
            self.limits.check(request, size)

    def snapshot(self) -> dict:
        """Per tenant: calls admitted and refused by its rate (None: no rate); no credentials."""
        if self.directory is None:
            return {}
        return {name: None if tenant.bucket is None else
                {"admitted": tenant.bucket.taken, "rate_limited": tenant.bucket.refused}
                for name, tenant in self.directory.tenants.items()}

    @staticmethod
    def may_use(call, model: str) -> bool:
        tenant = call.tenant
        return tenant is None or tenant.may_use(model)
