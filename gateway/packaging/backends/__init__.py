"""tensorgate's Python-based Triton backends: one generic runner (`runner.py`), installed as
`<backend-directory>/tensorgate_onnx/model.py` and `<backend-directory>/tensorgate_torchscript/model.py`,
which serves a model folder holding only config.pbtxt and N/model.onnx (or N/model.pt) on a Triton
that has just the Python backend (the nvidia-pytriton wheel's). `python_callable.py` is the model.py
written into the version folder of a packaged Python callable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUNNER = Path(__file__).with_name("runner.py")
#: Python-based backend name → the model.py that implements it.
PYTHON_BASED_BACKENDS = {"tensorgate_onnx": RUNNER, "tensorgate_torchscript": RUNNER}


def install_backends(backend_directory: Path) -> list[Path]:
    """Write each Python-based backend as `backend_directory/<name>/model.py`; returns the files."""
    written = []
    for name, source in PYTHON_BASED_BACKENDS.items():
        target = Path(backend_directory) / name / "model.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written
