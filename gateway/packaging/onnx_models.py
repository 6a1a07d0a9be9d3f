"""ONNX sources: an ONNX file as it is, or a scikit-learn, XGBoost or LightGBM model converted to ONNX
(skl2onnx, onnxmltools); the signature is read from the graph's inputs and outputs."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from gateway.packaging.artifact import Artifact
from gateway.packaging.errors import SignatureUnknown, SourceError
from gateway.packaging.signature import Signature, Tensor

# Opsets every converted model is written at: within what the pinned production Triton's ONNX
# Runtime (24.10: ORT 1.19) runs, so a package converted here loads there too.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# onnxmltools 1.16 converts XGBoost and LightGBM models at opset 15 at most.
ONNXMLTOOLS_OPSET = 15
# The graph name is the only part of a converted model that changes from one conversion to the
# next (skl2onnx names it by a fresh uuid): fixed, so the same model always gives the same bytes.
GRAPH_NAME = "tensorgate"

# onnx.TensorProto element types → KServe v2 datatypes.
_ELEMENT_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
                  8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16"}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise SourceError("reading ONNX models needs the `onnx` package: pip install 'tensorgate[package]'") from None
    return onnx


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def onnx_signature(model) -> Signature:
    """Inputs (initializers excluded) and outputs of an onnx.ModelProto's graph."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(_tensor(value, "input") for value in graph.input if value.name not in initializers)
    outputs = tuple(_tensor(value, "output") for value in graph.output)
    if not inputs or not outputs:
        raise SignatureUnknown("the ONNX graph declares no inputs or no outputs; declare them with "
                               "--input NAME:DTYPE:DIMS and --output NAME:DTYPE:DIMS")
    return Signature(inputs, outputs)


def _tensor(value, role: str) -> Tensor:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        hint = " (a ZipMap of probabilities: convert with zipmap=False)" if kind in ("sequence_type", "map_type") else ""
        raise SignatureUnknown(f"{role} '{value.name}' of the ONNX graph is a {kind}, not a tensor{hint}: "
                               "Triton serves tensors only")
    tensor_type = value.type.tensor_type
    datatype = _ELEMENT_TYPES.get(tensor_type.elem_type)
    if datatype is None:
        raise SignatureUnknown(f"{role} '{value.name}' has ONNX element type {tensor_type.elem_type}, "
                               f"which has no KServe v2 datatype")
    if not tensor_type.HasField("shape"):
        raise SignatureUnknown(f"{role} '{value.name}' of the ONNX graph has no shape; declare it with "
                               f"--{role} {value.name}:{datatype}:DIMS")
    shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1
                  for dim in tensor_type.shape.dim)
    return Tensor(value.name, datatype, shape)


def onnx_artifact(data: bytes, source: dict) -> Artifact:
    onnx = _onnx()
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises DecodeError, ValidationError, …
        raise SourceError(f"{source.get('path', 'the source')} is not a valid ONNX model: {error}") from None
    return Artifact("onnx", {"model.onnx": data}, onnx_signature(model),
                    {**source, "onnx": _version("onnx"), "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import}})


def _finish(model, source: dict) -> Artifact:
    model.graph.name = GRAPH_NAME
    # Converted models give one row out per row in; some converters write a fixed 1 as the first
    # dim of an output (LightGBM's label): make it the free batch dimension it is.
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if value.type.WhichOneof("value") == "tensor_type" and dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    return onnx_artifact(model.SerializeToString(), source)


def _features(model, source_path: str) -> int:
    count = getattr(model, "n_features_in_", None)
    if count is None:
        raise SignatureUnknown(f"{source_path}: the model does not say how many features it takes "
                               "(no n_features_in_: was it fitted?)")
    return int(count)


def from_sklearn(model, source: dict) -> Artifact:
    """A fitted scikit-learn estimator or pipeline; classifiers give `label` and `probabilities` tensors."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise SourceError("converting scikit-learn models needs skl2onnx: pip install 'tensorgate[package]'") from None
    features = _features(model, source["path"])
    try:
        # zipmap=False: probabilities as a [batch, classes] tensor, not a list of dicts.
        onnx_model = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, features]))],
                                     target_opset=TARGET_OPSET, options={"zipmap": False}, name=GRAPH_NAME)
    except Exception as error:  # skl2onnx raises RuntimeError/NotImplementedError for unsupported models
        raise SourceError(f"skl2onnx could not convert {type(model).__name__} from {source['path']}: {error}") from None
    return _finish(onnx_model, {**source, "converter": f"skl2onnx {_version('skl2onnx')}",
                                "library": f"scikit-learn {_version('scikit-learn')}"})


def from_xgboost(model, source: dict) -> Artifact:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    features = _features(model, source["path"]) if not _is_booster(model) else int(model.num_features())
    try:
        onnx_model = onnxmltools.convert_xgboost(model, initial_types=[("input", FloatTensorType([None, features]))],
                                                 target_opset=ONNXMLTOOLS_OPSET)
    except Exception as error:
        raise SourceError(f"onnxmltools could not convert the XGBoost model {source['path']}: {error}") from None
    return _finish(onnx_model, {**source, "converter": f"onnxmltools {_version('onnxmltools')}",
                                "library": f"xgboost {_xgboost_version()}"})


def from_lightgbm(model, source: dict) -> Artifact:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    features = int(model.num_feature()) if _is_booster(model) else _features(model, source["path"])
    try:
        onnx_model = onnxmltools.convert_lightgbm(model, initial_types=[("input", FloatTensorType([None, features]))],
                                                  target_opset=ONNXMLTOOLS_OPSET, zipmap=False)
    except Exception as error:
        raise SourceError(f"onnxmltools could not convert the LightGBM model {source['path']}: {error}") from None
    return _finish(onnx_model, {**source, "converter": f"onnxmltools {_version('onnxmltools')}",
                                "library": f"lightgbm {_version('lightgbm')}"})


def _is_booster(model) -> bool:
    return type(model).__name__ == "Booster"


def _xgboost_version() -> str:
    version = _version("xgboost")
    return version if version != "unknown" else _version("xgboost-cpu")


def read_onnx_file(path: Path) -> Artifact:
    return onnx_artifact(path.read_bytes(), {"kind": "onnx", "path": str(path)})
