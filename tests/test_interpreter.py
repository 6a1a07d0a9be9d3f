"""gateway/server/interpreter.py: how the running CPython was built, read from its build flags."""

import platform
import sysconfig

import pytest

from gateway.server import interpreter

# PY_CFLAGS_NODIST as two builds on this machine report it (benchmarks/RESULTS.md, "Eighth session").
PYENV_DEFAULT = ("-std=c11 -Wextra -Wno-unused-parameter -Wno-missing-field-initializers "
                 "-Werror=implicit-function-declaration -fvisibility=hidden  -I./Include/internal")
PGO_LTO = ("-fno-semantic-interposition -flto -fuse-linker-plugin -ffat-lto-objects -flto-partition=none -g "
           "-std=c11 -Wextra -fvisibility=hidden -fprofile-use -fprofile-correction -I./Include/internal")


@pytest.mark.parametrize(("cflags", "build"), [
    (PYENV_DEFAULT, "no PGO/LTO"),
    (PGO_LTO, "PGO+LTO"),
    ("-O3 -fprofile-use -fprofile-correction", "PGO"),
    ("-O3 -flto=auto", "LTO"),
    ("-O3 -flto-partition=none", "no PGO/LTO"),  # an LTO tuning flag alone is not LTO
    ("-flto=thin -fprofile-instr-use=/build/code.profclangd", "PGO+LTO"),  # clang's spelling
    ("-fprofile-generate", "no PGO/LTO"),  # the instrumented first stage of a PGO build
    ("", "no PGO/LTO"),
])
def test_a_build_is_named_by_its_flags(cflags, build):
    assert interpreter.build_of(cflags) == build


@pytest.mark.parametrize(("cflags", "build"), [(PGO_LTO, "PGO+LTO"), (PYENV_DEFAULT, "no PGO/LTO"), (None, "no PGO/LTO")])
def test_the_running_interpreter_is_described_by_its_own_build_flags(monkeypatch, cflags, build):
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: cflags if name == "PY_CFLAGS_NODIST" else real(name))
    assert interpreter.describe() == f"{platform.python_implementation()} {platform.python_version()} ({build})"
