"""TorchScript sources: the file as it is; the signature from --input/--output or an example input
(a TorchScript file records argument names, not tensor shapes or datatypes)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from gateway.packaging.artifact import Artifact
from gateway.packaging.errors import SourceError
from gateway.packaging.probe import name_outputs, probe_signature
from gateway.packaging.signature import Tensor


def _torch():
    try:
        import torch
    except ImportError:
        raise SourceError("reading a TorchScript file needs torch: pip install 'tensorgate[package]' "
                          "(torch==2.13.0, the CPU build)") from None
    return torch


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding `*/constants.pkl` and `*/code/`."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_torchscript(path: Path, declared_inputs: Sequence[Tensor], declared_outputs: Sequence[Tensor],
                     example: Path | None) -> Artifact:
    torch = _torch()
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:  # torch raises RuntimeError for anything that is not an archive
        raise SourceError(f"{path} is not a TorchScript file torch.jit.load can read: {error}") from None
    # forward(self, a, b): the argument names are the model's input names.
    input_names = [argument.name for argument in module.forward.schema.arguments[1:]]

    def run(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in input_names))
        if isinstance(result, torch.Tensor):
            result = result.numpy()
        elif isinstance(result, (tuple, list)):
            result = tuple(r.numpy() for r in result)
        elif isinstance(result, dict):
            result = {k: v.numpy() for k, v in result.items()}
        return name_outputs(result, declared_outputs)

    signature, _ = probe_signature(what=f"the TorchScript file {path}", run=run, input_names=input_names,
                                   declared_inputs=declared_inputs, declared_outputs=declared_outputs, example=example)
    return Artifact("torchscript", {"model.pt": path.read_bytes()}, signature,
                    {"kind": "torchscript", "path": str(path), "torch": importlib.metadata.version("torch")})
