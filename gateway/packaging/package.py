"""`package()`: a trained model (ONNX, TorchScript, scikit-learn, XGBoost, LightGBM, a Python callable)
→ an immutable, versioned Triton model folder, recorded in the audit log.

    result = package(PackageRequest(source="model.joblib", name="iris", repository=Path("models")))
    result.version, result.digest, result.created
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from gateway.audit import AuditLog, default_audit_path
from gateway.packaging.artifact import FRAMEWORK_BACKEND, PYTHON_BASED_BACKEND, Artifact
from gateway.packaging.callables import is_entry_point, read_callable
from gateway.packaging.errors import PackageError, SourceError
from gateway.packaging.model_config import BatchingOptions
from gateway.packaging.onnx_models import from_lightgbm, from_sklearn, from_xgboost, read_onnx_file
from gateway.packaging.reference import read_reference, reference_bytes
from gateway.packaging.repository import PackagedVersion, write_version
from gateway.packaging.signature import Signature, Tensor
from gateway.packaging.torchscript import is_torchscript, read_torchscript

KINDS = ("auto", "onnx", "torchscript", "sklearn", "xgboost", "lightgbm", "python")
BACKENDS = ("auto", "onnxruntime", "pytorch", "python")
#: max_batch_size when the model can batch and --max-batch-size is not given.
DEFAULT_MAX_BATCH_SIZE = 64
_PICKLES = (".pkl", ".pickle", ".joblib")


@dataclass(frozen=True)
class PackageRequest:
    source: str
    """A model file, or `module:function` for a Python callable."""
    name: str
    repository: Path
    kind: str = "auto"
    backend: str = "auto"
    max_batch_size: int | None = None
    """None: DEFAULT_MAX_BATCH_SIZE when every tensor's first dimension is free, else 0."""
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    example: Path | None = None
    reference: Path | None = None
    version: int | None = None
    audit_log: Path | None = None
    """None: default_audit_path(repository)."""
    actor: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class PackageResult:
    packaged: PackagedVersion
    backend: str
    audit_record: dict = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.packaged.version

    @property
    def digest(self) -> str:
        return self.packaged.digest

    @property
    def created(self) -> bool:
        return self.packaged.created

    @property
    def path(self) -> Path:
        return self.packaged.path


def local_triton_backends() -> set[str]:
    """The backends the nvidia-pytriton wheel's Triton ships (only `python` in 0.7.0); empty when the
    wheel is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return set()
    backends = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "backends"
    return {p.name for p in backends.iterdir() if p.is_dir()} if backends.is_dir() else set()


def resolve_backend(requested: str, model_format: str) -> str:
    """The Triton backend for a model format: --backend python → tensorgate's Python-based backend (or
    the Python backend itself for a callable); auto → the framework backend where the local Triton has
    it (or where there is no local Triton: a production image), else the Python-based one."""
    framework = FRAMEWORK_BACKEND[model_format]
    if requested not in BACKENDS:
        raise PackageError(f"--backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested == "python":
        return PYTHON_BASED_BACKEND[model_format]
    if requested == "auto":
        local = local_triton_backends()
        return framework if not local or framework in local else PYTHON_BASED_BACKEND[model_format]
    if requested != framework:
        raise PackageError(f"--backend {requested} cannot serve a {model_format} model; use {framework}, python or auto")
    return requested


def detect_kind(source: str, kind: str) -> str:
    if kind not in KINDS:
        raise SourceError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    path = Path(source)
    if not path.exists():
        if is_entry_point(source):
            return "python"
        raise SourceError(f"{source} is neither a file nor a module:function entry point")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in _PICKLES:
        return "pickle"
    if is_torchscript(path):
        return "torchscript"
    raise SourceError(f"{source}: cannot tell what kind of model this is from its name; pass --kind "
                      f"({', '.join(KINDS[1:])})")


def _load_pickle(path: Path):
    """A pickled or joblib-dumped model. Loading a pickle runs code from it: package only your own."""
    try:
        import joblib
    except ImportError:
        raise SourceError("loading pickled models needs joblib (with scikit-learn): pip install 'tensorgate[package]'") from None
    try:
        return joblib.load(path)
    except Exception as error:  # unpickling can raise anything
        raise SourceError(f"{path}: cannot load it with joblib ({type(error).__name__}: {error})") from None


def _native_booster(path: Path, kind: str):
    """An XGBoost (.json/.ubj) or LightGBM (.txt) model file in the library's own format."""
    if kind == "xgboost":
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        return booster
    import lightgbm

    return lightgbm.Booster(model_file=str(path))


def _model_kind(model) -> str:
    module = type(model).__module__.split(".")[0]
    if module in ("xgboost", "lightgbm"):
        return module
    if module == "sklearn" or hasattr(model, "fit") and hasattr(model, "get_params"):
        return "sklearn"
    raise SourceError(f"a pickled {type(model).__module__}.{type(model).__name__} is not a model tensorgate can "
                      "convert (scikit-learn, XGBoost or LightGBM)")


def load_artifact(request: PackageRequest) -> Artifact:
    kind = detect_kind(request.source, request.kind)
    path = Path(request.source)
    if kind == "python":
        return read_callable(request.source, request.inputs, request.outputs, request.example)
    if not path.is_file():
        raise SourceError(f"{path} does not exist or is not a file")
    if kind == "onnx":
        return read_onnx_file(path)
    if kind == "torchscript":
        return read_torchscript(path, request.inputs, request.outputs, request.example)
    if kind in ("xgboost", "lightgbm") and path.suffix.lower() not in _PICKLES:
        model = _native_booster(path, kind)
    else:
        model = _load_pickle(path)
        found = _model_kind(model)
        if kind not in ("pickle", found):
            raise SourceError(f"{path} holds a {found} model, not {kind}")
        kind = found
    source = {"kind": kind, "path": str(path), "model_class": f"{type(model).__module__}.{type(model).__name__}"}
    return {"sklearn": from_sklearn, "xgboost": from_xgboost, "lightgbm": from_lightgbm}[kind](model, source)


def batching_options(request: PackageRequest, signature: Signature) -> BatchingOptions:
    size = request.max_batch_size
    if size is None:
        size = DEFAULT_MAX_BATCH_SIZE if signature.batchable else 0
    if size < 0:
        raise PackageError(f"--max-batch-size {size}: expected 0 (no batching) or more")
    if size > 0 and not signature.batchable:
        raise PackageError(f"--max-batch-size {size}: the model cannot batch, as not every tensor's first "
                           f"dimension is free ({signature.describe()}); use --max-batch-size 0")
    if request.dynamic_batching and size == 0:
        raise PackageError("--dynamic-batching needs --max-batch-size above 0 (and a model whose first dimension is free)")
    if request.max_queue_delay_us and not request.dynamic_batching:
        raise PackageError("--max-queue-delay-us applies to --dynamic-batching only")
    return BatchingOptions(size, request.dynamic_batching, request.max_queue_delay_us)


def package(request: PackageRequest) -> PackageResult:
    """Package the source as the next version of repository/name (or find the version holding it),
    and record it in the audit log. Raises a PackageError subclass on bad input or a conflict."""
    if not request.name or "/" in request.name or request.name.startswith("."):
        raise PackageError(f"--name {request.name!r}: expected a model name (no '/', not starting with '.')")
    if request.version is not None and request.version < 1:
        raise PackageError(f"--version {request.version}: Triton's versions are numbered from 1")
    artifact = load_artifact(request)
    backend = resolve_backend(request.backend, artifact.format)
    batching = batching_options(request, artifact.signature)
    reference = shapes = None
    if request.reference is not None:
        arrays = read_reference(request.reference, artifact.signature)
        reference = reference_bytes(arrays)
        shapes = {name: list(array.shape) for name, array in sorted(arrays.items())}
    packaged = write_version(Path(request.repository), request.name, artifact, backend=backend, batching=batching,
                             reference=reference, reference_shapes=shapes, version=request.version)
    record = {}
    if packaged.created:
        log = AuditLog(request.audit_log or default_audit_path(request.repository))
        record = log.append(
            action="package", actor=request.actor, model=request.name, version=packaged.version, digest=packaged.digest,
            reason=request.reason or f"packaged {artifact.source.get('path') or artifact.source.get('entry_point')}",
            evidence={"source": artifact.source, "backend": backend, "batching": batching.as_dict(),
                      "signature": artifact.signature.as_dict(), "path": str(packaged.path),
                      "reference": packaged.manifest.get("reference")},
        )
    return PackageResult(packaged, backend, record)
