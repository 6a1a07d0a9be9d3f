"""Python callable sources (`module:function`, NumPy arrays in and out): the module's code is copied
into the version folder and run by a small Python-backend model.py; the signature is declared with
--input/--output or probed by calling the function once on an example input."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

from gateway.packaging.artifact import Artifact
from gateway.packaging.errors import SourceError
from gateway.packaging.probe import name_outputs, probe_signature
from gateway.packaging.signature import Tensor

ENTRY_POINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
RUNNER = Path(__file__).with_name("backends") / "python_callable.py"
_SKIPPED = ("__pycache__",)


def is_entry_point(text: str) -> bool:
    return bool(ENTRY_POINT.match(text))


def _module_files(module_name: str) -> dict[str, bytes]:
    """The source files of the module's top-level package (or the module itself), by path under src/."""
    top = module_name.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise SourceError(f"module {top!r} has no source file to package")
    origin = Path(spec.origin)
    installed = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    if any(folder in origin.resolve().parents for folder in installed):
        raise SourceError(f"module {top!r} is installed ({origin}), not your code: package a module of your own "
                          "that calls it (the libraries it needs belong in the serving image)")
    if spec.submodule_search_locations:  # a package: every .py file under it
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in root.rglob("*.py") if not any(part in _SKIPPED for part in p.parts))
        return {f"src/{top}/{p.relative_to(root).as_posix()}": p.read_bytes() for p in files}
    if origin.suffix != ".py":
        raise SourceError(f"module {top!r} is compiled ({origin.name}); only Python source modules can be packaged")
    return {f"src/{top}.py": origin.read_bytes()}


def read_callable(entry_point: str, declared_inputs: Sequence[Tensor], declared_outputs: Sequence[Tensor],
                  example: Path | None) -> Artifact:
    module_name, _, function_name = entry_point.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # modules of the current folder, as `python -m` would find them
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise SourceError(f"cannot import {module_name!r} for {entry_point}: {type(error).__name__}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SourceError(f"{entry_point}: {module_name} has no callable {function_name!r}")
    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    input_names = [p.name for p in parameters]

    def run(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return name_outputs(function(*(arrays[name] for name in input_names)), declared_outputs)

    signature, _ = probe_signature(what=f"the callable {entry_point}", run=run, input_names=input_names,
                                   declared_inputs=declared_inputs, declared_outputs=declared_outputs, example=example)
    files = _module_files(module_name)
    files["callable.json"] = (json.dumps({"module": module_name, "function": function_name}, sort_keys=True,
                                         indent=2) + "\n").encode()
    files["model.py"] = RUNNER.read_bytes()
    return Artifact("python", files, signature, {"kind": "python", "entry_point": entry_point})
