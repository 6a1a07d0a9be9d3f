"""`Artifact`: what a source becomes before it is written — the files of one model version and its signature."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.packaging.signature import Signature

#: How each format's files are served: the Triton framework backend of production images, and the
#: tensorgate Python-based backend that runs the same file where only the Python backend exists.
FRAMEWORK_BACKEND = {"onnx": "onnxruntime", "torchscript": "pytorch", "python": "python"}
PYTHON_BASED_BACKEND = {"onnx": "tensorgate_onnx", "torchscript": "tensorgate_torchscript", "python": "python"}
MODEL_FILE = {"onnx": "model.onnx", "torchscript": "model.pt", "python": "model.py"}


@dataclass(frozen=True)
class Artifact:
    format: str
    """onnx, torchscript or python."""
    files: dict[str, bytes]
    """The version folder's model files by relative path (the weights, or the callable's code)."""
    signature: Signature
    source: dict = field(default_factory=dict)
    """Where it came from: kind, path or entry point, converter and library versions."""
