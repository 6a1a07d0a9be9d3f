"""Build steps that pyproject.toml cannot declare: the Cython kernels and the protocol descriptors.

- `ext/*.pyx` are compiled into the importable package `gateway.ext` (the folder shows the native
  boundary; the import path stays one name).
- `protos/*.proto` are compiled by grpcio-tools into one FileDescriptorSet,
  `gateway/protocol/tensorgate.binpb`, which the gateway loads into a private descriptor pool
  (see gateway/protocol/__init__.py for why not the default pool).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DESCRIPTOR_SET = os.path.join("gateway", "protocol", "tensorgate.binpb")


def compile_protos() -> None:
    """Run protoc (from grpcio-tools) over protos/ into the descriptor set, if it is stale."""
    protos = sorted(glob.glob(os.path.join(HERE, "protos", "*.proto")))
    target = os.path.join(HERE, DESCRIPTOR_SET)
    if os.path.exists(target) and all(os.path.getmtime(p) <= os.path.getmtime(target) for p in protos):
        return
    command = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"--proto_path={os.path.join(HERE, 'protos')}",
        f"--descriptor_set_out={target}",
        "--include_imports",
        *[os.path.basename(p) for p in protos],
    ]
    subprocess.check_call(command, cwd=os.path.join(HERE, "protos"))


# ext/h2server.pyx (the h2 engine's HTTP/2) links libnghttp2 by its runtime soname: distributions ship
# the library (curl depends on it) without headers or the unversioned .so, and ext/nghttp2_api.h
# declares the part of its stable ABI that is used.
NGHTTP2_SONAME = "libnghttp2.so.14"


def nghttp2_found() -> bool:
    """Whether the soname the extension links against loads here."""
    import ctypes

    try:
        ctypes.CDLL(NGHTTP2_SONAME)
    except OSError:
        return False
    return True


def extensions() -> list[Extension]:
    modules = []
    for source in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(source))[0]
        link_args = []
        if name == "h2server":
            if not nghttp2_found():
                print(f"setup.py: {NGHTTP2_SONAME} not found: the h2 engine is not built "
                      "(install it: Debian/Ubuntu libnghttp2-14, Fedora libnghttp2)", file=sys.stderr)
                continue
            link_args = [f"-l:{NGHTTP2_SONAME}"]
        modules.append(
            Extension(
                f"gateway.ext.{name}",
                [source],
                include_dirs=[numpy.get_include(), "ext"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"],
                extra_link_args=link_args,
            )
        )
    return cythonize(modules, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


# Every setuptools entry point (wheel, sdist, editable install) passes through here, so generating the
# descriptor set at this point keeps one build path for all of them.
compile_protos()
setup(
    packages=[
        "gateway",
        *[f"gateway.{p}" for p in ("protocol", "pipeline", "server", "server.engines", "routing", "upstream", "local", "batching", "drift", "telemetry", "bench", "admin")],
        "gateway.ext",
        "gateway.ext.drift",
    ],
    package_dir={"gateway": "gateway", "gateway.ext": "ext"},
    ext_modules=extensions(),
)
