"""Tenants and their credentials: who a call comes from, what models it may use, at what rate.

A credential (bearer token or API key) is found by the first half of its SHA-256 digest in a dict,
and the whole digest is then compared with `hmac.compare_digest`: the gateway never holds a
credential's text, and what a lookup's timing could reveal is about digests, from which no
credential can be worked back. Messages never repeat a credential.
"""

from __future__ import annotations

import hmac

from gateway.errors import ConfigError, PermissionDenied, RateLimited, Unauthenticated
from gateway.security.config import ALL_MODELS, AuthConfig, TenantConfig
from gateway.security.ratelimit import TokenBucket
from gateway.security.secrets import digest, read_digests

_LOOKUP = 16  # bytes of a digest that find its entry; the whole digest is then compared in constant time
_SHOWN_NAME = 128  # a model name repeated in a refusal is cut to this many characters


def shown(name: str) -> str:
    """A client's model name as a refusal repeats it: bounded, so a huge name cannot bloat an answer."""
    return repr(name) if len(name) <= _SHOWN_NAME else repr(name[:_SHOWN_NAME]) + f"… ({len(name)} characters)"


class Tenant:
    """A tenant as the hot path sees it: a name, an allow-list, a bucket (or None), an admin flag."""

    __slots__ = ("name", "all_models", "models", "bucket", "admin")

    def __init__(self, name: str, config: TenantConfig) -> None:
        self.name = name
        self.all_models = ALL_MODELS in config.models
        self.models = frozenset(config.models)
        rate = config.rate
        self.bucket = None if rate is None else TokenBucket(rate.requests_per_s, rate.capacity)
        self.admin = config.admin

    def __repr__(self) -> str:
        models = "*" if self.all_models else f"{len(self.models)} models"
        return f"<Tenant {self.name} {models} admin={self.admin} {self.bucket!r}>"

    def may_use(self, model: str) -> bool:
        return self.all_models or model in self.models

    def check_model(self, model: str) -> None:
        """PERMISSION_DENIED unless this tenant may use `model` (whether it exists is not said)."""
        if not (self.all_models or model in self.models):
            raise PermissionDenied(f"tenant '{self.name}' may not use model {shown(model)}; "
                                   f"ask the gateway's operator to add it to the tenant's models")

    def spend(self) -> None:
        """Take one request from the tenant's rate; RESOURCE_EXHAUSTED with a pushback when over it."""
        bucket = self.bucket
        if bucket is not None:
            wait_ms = bucket.take()
            if wait_ms:
                raise RateLimited(
                    f"tenant '{self.name}' is over its rate limit of {bucket.rate:g} requests/s "
                    f"(burst {bucket.capacity:g}); retry in {wait_ms} ms", wait_ms)


class TenantDirectory:
    """Every tenant by the digests of its credentials; `authenticate(call)` says who is calling."""

    def __init__(self, config: AuthConfig, path: str = "auth") -> None:
        self.api_key_header = config.api_key_header
        self.tenants = {name: Tenant(name, tenant) for name, tenant in config.tenants.items()}
        # digest[:16] -> (digest, tenant)
        self._by_token: dict[bytes, tuple[bytes, Tenant]] = {}
        self._by_key: dict[bytes, tuple[bytes, Tenant]] = {}
        for name, tenant in config.tenants.items():
            self._add(self._by_token, tenant.tokens, self.tenants[name], f"{path}.tenants.{name}.tokens")
            self._add(self._by_key, tenant.api_keys, self.tenants[name], f"{path}.tenants.{name}.api_keys")

    def __repr__(self) -> str:
        return (f"<TenantDirectory {len(self.tenants)} tenants, {len(self._by_token)} tokens, "
                f"{len(self._by_key)} api keys>")

    @staticmethod
    def _add(table: dict, secrets, tenant: Tenant, path: str) -> None:
        for index, secret in enumerate(secrets):
            for credential in read_digests(secret, f"{path}[{index}]"):
                other = table.get(credential[:_LOOKUP])
                if other is not None and other[1] is not tenant:
                    raise ConfigError(f"{path}[{index}]", f"the same credential is given to tenant '{other[1].name}' too")
                table[credential[:_LOOKUP]] = (credential, tenant)

    def authenticate(self, call) -> Tenant:
        """The tenant whose credential `call` carries; UNAUTHENTICATED when none or an unknown one."""
        authorization = call.header("authorization")
        if authorization is not None:
            scheme, _, token = str(authorization).partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            presented, table = digest(token), self._by_token
        else:
            key = call.header(self.api_key_header)
            if key is None:
                raise Unauthenticated(f"no credential: send 'authorization: Bearer <token>' or "
                                      f"'{self.api_key_header}: <key>' metadata")
            presented, table = digest(key if isinstance(key, bytes) else key.strip()), self._by_key
        found = table.get(presented[:_LOOKUP])
        if found is None or not hmac.compare_digest(found[0], presented):
            raise Unauthenticated("the credential is not valid (unknown, revoked, or of the other kind)")
        return found[1]
