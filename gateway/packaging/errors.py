"""What can go wrong while packaging or verifying a model; each class carries the gRPC status a
deploy service reports it with.

    PackageError (GatewayError)     base
    ├── SourceError                 the source cannot be read, recognised or converted   INVALID_ARGUMENT
    ├── SignatureUnknown            the model's inputs/outputs cannot be read from it;   INVALID_ARGUMENT
    │                               the message names the option to supply
    ├── PackageConflict             packaging would overwrite something, or the model    FAILED_PRECONDITION
    │                               folder's shared config does not fit this version
    └── TamperedPackage             a packaged version no longer matches its manifest    FAILED_PRECONDITION

The CLI exits 2 on any of them (bad input or a refusal), naming the path or option concerned.
"""

from __future__ import annotations

import grpc

from gateway.errors import GatewayError


class PackageError(GatewayError):
    """`path` is the file or folder concerned, when there is one."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class SourceError(PackageError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class SignatureUnknown(PackageError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PackageConflict(PackageError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class TamperedPackage(PackageError):
    """`path` is the file (or folder) that does not match."""

    code = grpc.StatusCode.FAILED_PRECONDITION
