"""`tensorgate package`: trained models → immutable, versioned Triton model folders.

    package(PackageRequest(...)) -> PackageResult      write (or find) a version, audit it
    verify_version(model_dir, version) -> manifest      refuse a tampered version (TamperedPackage)
    write_build_context(...)                            a reproducible Docker build context

Modules: `signature` (tensors and their datatypes), `onnx_models` (ONNX files; scikit-learn, XGBoost,
LightGBM converted), `torchscript`, `callables` (module:function), `probe` (signatures by running a
model on an example), `model_config` (config.pbtxt), `reference` (the drift reference file),
`repository` (immutable versions, manifests, digests, verify), `dockerfile` (build contexts),
`backends/` (tensorgate's Python-based Triton backends), `errors`.
"""

from gateway.packaging.errors import PackageConflict, PackageError, SignatureUnknown, SourceError, TamperedPackage
from gateway.packaging.package import PackageRequest, PackageResult, package, resolve_backend
from gateway.packaging.repository import (
    PackagedVersion,
    content_digest,
    load_config_json,
    read_manifest,
    verify_model,
    verify_version,
    versions,
)
from gateway.packaging.signature import Signature, Tensor, parse_tensor_option

__all__ = [
    "PackageConflict",
    "PackageError",
    "PackageRequest",
    "PackageResult",
    "PackagedVersion",
    "Signature",
    "SignatureUnknown",
    "SourceError",
    "TamperedPackage",
    "Tensor",
    "content_digest",
    "load_config_json",
    "package",
    "parse_tensor_option",
    "read_manifest",
    "resolve_backend",
    "verify_model",
    "verify_version",
    "versions",
]
