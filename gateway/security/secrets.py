"""Credentials read from files or environment variables, kept only as SHA-256 digests.

A credential's text lives in this process only while it is read and hashed; the gateway then holds
its digest, and compares what a client presents by digest (gateway/security/tenants.py). Errors
name where a credential was to be found, never what it is.
"""

from __future__ import annotations

import hashlib
import os

from gateway.errors import ConfigError
from gateway.security.config import Secret


def digest(credential: str | bytes) -> bytes:
    """The SHA-256 digest a credential is stored and looked up by."""
    if isinstance(credential, str):
        credential = credential.encode("utf-8", "surrogateescape")
    return hashlib.sha256(credential).digest()


def read_digests(secret: Secret, path: str) -> list[bytes]:
    """The digests of the credentials `secret` points to; ConfigError (naming `path` and where the
    credential was to be read, not its value) when there are none."""
    if secret.env is not None:
        value = os.environ.get(secret.env, "").strip()
        if not value:
            raise ConfigError(path, f"{secret.where()} is not set or empty")
        return [digest(value)]
    try:
        with open(secret.file, encoding="utf-8") as stream:
            lines = [line.strip() for line in stream]
    except OSError as error:
        raise ConfigError(path, f"cannot read {secret.where()}: {error.strerror}") from None
    values = [line for line in lines if line and not line.startswith("#")]
    if not values:
        raise ConfigError(path, f"{secret.where()} holds no credential")
    return [digest(value) for value in values]
