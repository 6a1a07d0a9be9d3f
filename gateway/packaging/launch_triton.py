#!/usr/bin/env python3
"""Entrypoint of tensorgate's CPU image: the nvidia-pytriton wheel's tritonserver, run directly.

    launch_triton.py --prepare DIR      gather the wheel's Python backend into DIR/python (at build time)
    launch_triton.py --health           exit 0 when Triton answers ready ($TENSORGATE_HEALTH_URL, else
                                        http://127.0.0.1:8000/v2/health/ready), 1 otherwise
    launch_triton.py [TRITON ARGS…]     exec tritonserver in explicit model-control mode with the args

What it takes, as gateway/local/triton.py does: the Python backend's library, its utils module and
the stub for this Python in one folder; this Python's libpython and the wheel's own libraries first
on the library path. Standalone: it imports nothing of tensorgate.
"""

import importlib.util
import os
import shutil
import sys
import sysconfig
import urllib.request
from pathlib import Path


def _pytriton() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("launch_triton.py: nvidia-pytriton is not installed (requirements-cpu.txt installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare(directory: Path) -> None:
    root = _pytriton() / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    target = directory / "python"
    target.mkdir(parents=True, exist_ok=True)
    for path in (root / "backends" / "python" / "libtriton_python.so",
                 root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(path, target / path.name)


def healthy() -> bool:
    url = os.environ.get("TENSORGATE_HEALTH_URL", "http://127.0.0.1:8000/v2/health/ready")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve(args: list) -> None:
    binary = _pytriton() / "tritonserver" / "bin" / "tritonserver"
    libraries = [sysconfig.get_config_var("LIBDIR") or "", str(_pytriton().parent / "nvidia_pytriton.libs"),
                 os.environ.get("LD_LIBRARY_PATH", "")]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libraries if d)
    # The stub's interpreter finds its packages through the `python3` first on PATH.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    command = [str(binary), "--model-control-mode=explicit", "--strict-readiness=true", "--exit-on-error=true",
               "--disable-auto-complete-config", "--allow-sagemaker=false", "--allow-vertex-ai=false", *args]
    os.execv(command[0], command)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--prepare"] and len(args) == 2:
        prepare(Path(args[1]))
    elif args == ["--health"]:
        sys.exit(0 if healthy() else 1)
    else:
        serve(args)


if __name__ == "__main__":
    main()
