"""A reproducible Docker build context for one packaged version: a tar whose bytes depend only on the
package and the pinned versions (sorted members, mtime 0, uid/gid 0, fixed modes, no compression).

    Dockerfile             production: the pinned Triton container with its framework backends
    Dockerfile.cpu         a small CPU image: python slim + the nvidia-pytriton wheel's Triton (the
                           Triton the tests run), serving through tensorgate's Python-based backends
    requirements-cpu.txt   the CPU image's Python packages, each pinned with ==
    launch_triton.py       the CPU image's entrypoint and health probe (what gateway/local/triton.py
                           does: the wheel's Python backend gathered in one folder, libpython first)
    backends/              tensorgate's Python-based backends (tensorgate_onnx/model.py, …)
    models/NAME/config.pbtxt            the package's config, pinned to this version
    models/NAME/configs/cpu.pbtxt       the same with the Python-based backend (--model-config-name=cpu)
    models/NAME/N/…                     the version folder, as packaged (manifest included)

Both images run as a non-root user, probe readiness (HEALTHCHECK on /v2/health/ready), and start
Triton in explicit model-control mode loading only this model. No image is built here: there is no
container runtime on the development machines; the tests check the context's bytes and content.
"""

from __future__ import annotations

import importlib.metadata
import io
import tarfile
from pathlib import Path

import gateway.packaging.model_config as model_config
from gateway.packaging.artifact import PYTHON_BASED_BACKEND
from gateway.packaging.backends import PYTHON_BASED_BACKENDS
from gateway.packaging.errors import PackageConflict
from gateway.packaging.model_config import BatchingOptions
from gateway.packaging.repository import verify_version
from gateway.packaging.signature import Signature

#: Triton 2.51, the release the nvidia-pytriton 0.7.0 wheel carries (so both images run the same server).
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: The CPU image's base: the Python the wheel has a backend stub for, and the project's own Python.
CPU_BASE_IMAGE = "python:3.11.7-slim-bookworm"
#: The ONNX Runtime / PyTorch a Python-based backend needs inside the production image.
PRODUCTION_RUNTIMES = {"tensorgate_onnx": "onnxruntime==1.19.2", "tensorgate_torchscript": "torch==2.5.0"}
UID = 10001
PORTS = (8000, 8001, 8002)
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_SCRIPT = Path(__file__).with_name("launch_triton.py")


def _pinned(distribution: str) -> str:
    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        raise PackageConflict(f"--dockerfile pins the CPU image's packages to those installed here, and "
                              f"{distribution} is not installed: pip install 'tensorgate[local,package]'") from None


def cpu_requirements(model_format: str) -> str:
    lines = ["# The CPU image's packages, pinned to the versions `tensorgate package` ran with.",
             _pinned("nvidia-pytriton"), _pinned("numpy")]
    if model_format == "onnx":
        lines.append(_pinned("onnxruntime"))
    elif model_format == "torchscript":
        # The CPU build of torch (PyPI's default torch for Linux is the CUDA build, several GB).
        lines.insert(1, "--extra-index-url https://download.pytorch.org/whl/cpu")
        version = importlib.metadata.version("torch").split("+")[0]
        lines.append(f"torch=={version}+cpu")
    return "\n".join(lines) + "\n"


def _healthcheck(command: str) -> str:
    return f"HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 CMD {command}\n"


def production_dockerfile(name: str, backend: str) -> str:
    lines = [
        "# Production image: the pinned Triton with its framework backends, serving one immutable model version.\n",
        f"FROM {TRITON_IMAGE}\n",
    ]
    if backend in PYTHON_BASED_BACKENDS:
        lines += [f"RUN pip install --no-cache-dir {PRODUCTION_RUNTIMES[backend]}\n",
                  f"COPY backends/{backend}/ /opt/tritonserver/backends/{backend}/\n"]
    lines += [
        "COPY models/ /models/\n",
        f"USER {UID}:{UID}\n",
        f"EXPOSE {' '.join(map(str, PORTS))}\n",
        _healthcheck('["python3", "-c", "import urllib.request as r; '
                     "r.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)\"]"),
        f'ENTRYPOINT ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", '
        f'"--load-model={name}", "--strict-readiness=true", "--exit-on-error=true", "--disable-auto-complete-config"]\n',
    ]
    return "".join(lines)


def cpu_dockerfile(name: str) -> str:
    return "".join([
        "# CPU image: python slim + the nvidia-pytriton wheel's Triton (the one tensorgate's tests run), serving\n",
        "# through tensorgate's Python-based backends (configs/cpu.pbtxt). Same models/ as the production image.\n",
        f"FROM {CPU_BASE_IMAGE}\n",
        "ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1\n",
        "COPY requirements-cpu.txt launch_triton.py /opt/tensorgate/\n",
        "RUN pip install --no-cache-dir -r /opt/tensorgate/requirements-cpu.txt \\\n",
        "    && python /opt/tensorgate/launch_triton.py --prepare /opt/tensorgate/backends\n",
        "COPY backends/ /opt/tensorgate/backends/\n",
        "COPY models/ /models/\n",
        f"USER {UID}:{UID}\n",
        f"EXPOSE {' '.join(map(str, PORTS))}\n",
        _healthcheck('["python", "/opt/tensorgate/launch_triton.py", "--health"]'),
        f'ENTRYPOINT ["python", "/opt/tensorgate/launch_triton.py", "--backend-directory=/opt/tensorgate/backends", '
        f'"--model-repository=/models", "--load-model={name}", "--model-config-name=cpu"]\n',
    ])


def _context_configs(name: str, version: int, manifest: dict) -> tuple[str, str]:
    """config.pbtxt pinned to this version (its digest only, version_policy specific [N]), and the
    same with the Python-based backend for the CPU image."""
    signature = Signature.from_dict(manifest["signature"])
    batching = BatchingOptions.from_dict(manifest["batching"])
    texts = []
    for backend in (manifest["backend"], PYTHON_BASED_BACKEND[manifest["model_format"]]):
        config = model_config.build_config(name, signature, backend, batching, {version: manifest["digest"]})
        config.version_policy.specific.versions.append(version)
        texts.append(model_config.render(config))
    return texts[0], texts[1]


def context_files(model_dir: Path, version: int) -> dict[str, bytes]:
    """Every file of the build context by its path in the context. The version is verified first."""
    model_dir = Path(model_dir)
    manifest = verify_version(model_dir, version)
    name = model_dir.name
    production, cpu = _context_configs(name, version, manifest)
    files = {
        "Dockerfile": production_dockerfile(name, manifest["backend"]).encode(),
        "Dockerfile.cpu": cpu_dockerfile(name).encode(),
        "requirements-cpu.txt": cpu_requirements(manifest["model_format"]).encode(),
        "launch_triton.py": _SCRIPT.read_bytes(),
        f"models/{name}/config.pbtxt": production.encode(),
        f"models/{name}/configs/cpu.pbtxt": cpu.encode(),
    }
    for backend, source in sorted(PYTHON_BASED_BACKENDS.items()):
        files[f"backends/{backend}/model.py"] = source.read_bytes()
    folder = model_dir / str(version)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"models/{name}/{version}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    return files


def context_tar(files: dict[str, bytes]) -> bytes:
    """A tar of `files` whose bytes depend on nothing else: members sorted, parents before children,
    mtime 0, owner 0:0 with no names, fixed modes, USTAR headers, no compression."""
    directories = sorted({str(Path(p).parents[i]) for p in files for i in range(len(Path(p).parents) - 1)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path in sorted([*directories, *files]):
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path in files:
                info.size = len(files[path])
                info.mode = 0o755 if path == "launch_triton.py" else _FILE_MODE
                archive.addfile(info, io.BytesIO(files[path]))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = _DIR_MODE
                archive.addfile(info)
    return buffer.getvalue()


def write_build_context(model_dir: Path, version: int, output: Path) -> bytes:
    """Write the context tar to `output`; returns its bytes. An existing file is never overwritten
    (PackageConflict naming it), unless it already holds exactly these bytes."""
    data = context_tar(context_files(model_dir, version))
    output = Path(output)
    if output.exists():
        if output.read_bytes() == data:
            return data
        raise PackageConflict(f"{output} already exists with other content; nothing is overwritten: "
                              "choose another --context path", str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "xb") as stream:
        stream.write(data)
    return data
