"""The interpreter the gateway's Python runs on, and whether its build was optimized.

Every request's Python (the envoy engine's app, the pipeline's stages, the upstream client) runs on
CPython, and how CPython itself was compiled moves that cost: a build with profile-guided and
link-time optimization (`./configure --enable-optimizations --with-lto`, as the official `python`
Docker images that deploy/docker builds on are) spent 17 % less user CPU a request in-process and
about 6 % less gateway CPU a request end to end than pyenv's default build of 3.11
(benchmarks/RESULTS.md, "Eighth session"). So the gateway says at start which kind it runs on, and
the benchmarks print it beside their figures.

The build's own flags (sysconfig's PY_CFLAGS_NODIST: `-fprofile-use`, `-flto`) tell. With the envoy
engine the interpreter inside Envoy is the launcher's libpython (pyvoy preloads it), the build these
flags describe. A distribution may build its `python3` executable apart from its libpython with
flags of its own (Debian's 3.11 reports none here, whatever its executable was built with): the
flags name the build sysconfig was written for, which is the libpython's.
"""

from __future__ import annotations

import platform
import sysconfig

__all__ = ["build_of", "describe"]


def build_of(cflags: str) -> str:
    """"PGO+LTO", "PGO", "LTO" or "no PGO/LTO" from a CPython build's compiler flags."""
    flags = cflags.split()
    # gcc: -fprofile-use[=path]; clang: -fprofile-instr-use=path. -flto, -flto=auto, -flto=thin.
    pgo = any(flag.startswith(("-fprofile-use", "-fprofile-instr-use")) for flag in flags)
    lto = any(flag == "-flto" or flag.startswith("-flto=") for flag in flags)
    if pgo and lto:
        return "PGO+LTO"
    if pgo or lto:
        return "PGO" if pgo else "LTO"
    return "no PGO/LTO"


def _build() -> str:
    return build_of(sysconfig.get_config_var("PY_CFLAGS_NODIST") or "")


def describe() -> str:
    """"CPython 3.11.7 (no PGO/LTO)": the running interpreter and how it was built."""
    return f"{platform.python_implementation()} {platform.python_version()} ({_build()})"
