"""Request validation against its yardsticks, measured in one run.

    python benchmarks/bench_validation.py [--quick]             # the table below
    pytest benchmarks/bench_validation.py --benchmark-only      # the same cases under pytest-benchmark

Rows:
  - `bytes_element_count` (Cython, ext/tensorcheck.pyx) of a raw BYTES tensor, against its Python twin
    and, as the baseline, a copy of the same bytes (`bytes(memoryview)`: memcpy): walking the length
    prefixes should cost about what reading the bytes once does (ratio = copy time / kernel time);
  - `validate_request` (gateway/pipeline/validation.py) of a parsed request, against the upb parse of
    the same request's bytes (`ModelInferRequest.FromString`), the other per-request cost every
    request pays before it is forwarded (ratio = parse time / validation time). No twin: validation
    is Python, its BYTES walk the kernel above.

The signature and requests are those of bench_hot_path.py (simple_scale-like, 1×16 FP32) and
bytes_batch of bench_kernels.py; timing as bench_kernels.py (best of alternating rounds).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import KiB, MiB, bytes_batch  # noqa: E402 - the setups are shared, not copied

from gateway.bench.measure import best_time, format_time, machine, table  # noqa: E402
from gateway.ext import tensorcheck, tensorcheck_py  # noqa: E402
from gateway.pipeline.validation import validate_request  # noqa: E402
from gateway.protocol import pb  # noqa: E402
from gateway.protocol.tensors import ModelSignature, TensorSpec  # noqa: E402


def signature(columns: int, datatype: str = "FP32") -> ModelSignature:
    return ModelSignature(
        name="simple_scale", version="1",
        inputs={"INPUT0": TensorSpec("INPUT0", datatype, (-1, columns))},
        outputs={"OUTPUT0": TensorSpec("OUTPUT0", datatype, (-1, columns))},
        max_batch_size=64, decoupled=False, sequence=False, sequence_idle_s=None,
    )


@functools.cache
def request_bytes(rows: int, columns: int, datatype: str = "FP32") -> bytes:
    request = pb.ModelInferRequest(model_name="simple_scale")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[rows, columns])
    if datatype == "BYTES":
        raw, _ = bytes_batch(rows * columns * 36, 32, 1)
    else:
        raw = np.random.default_rng(0).random((rows, columns), np.float32).tobytes()
    request.raw_input_contents.append(raw)
    del tensor
    return request.SerializeToString()


@dataclass(frozen=True)
class Case:
    kernel: str
    size: str
    build: Callable[[str], Callable[[], object] | None]  # implementation ("kernel", "twin") -> the call
    baseline: Callable[[], Callable[[], object]]
    baseline_name: str

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.size}"


def count_case(total: int, element_bytes: int, label: str) -> Case:
    raw, _ = bytes_batch(total, element_bytes, 1)

    def build(implementation):
        module = tensorcheck if implementation == "kernel" else tensorcheck_py
        return functools.partial(module.bytes_element_count, raw)

    view = memoryview(raw)
    return Case("bytes_element_count", label, build, lambda: functools.partial(bytes, view), "bytes(view) copy")


def validate_case(rows: int, columns: int, datatype: str, label: str) -> Case:
    payload = request_bytes(rows, columns, datatype)
    request = pb.ModelInferRequest.FromString(payload)
    model = signature(columns, datatype)

    def build(implementation):
        if implementation != "kernel":
            return None
        return functools.partial(validate_request, request, model)

    return Case("validate_request", label, build, lambda: functools.partial(pb.ModelInferRequest.FromString, payload),
                "upb FromString")


CASES = [
    count_case(64 * KiB, 64, "64 KiB of 64 B"),
    count_case(1 * MiB, 1 * KiB, "1 MiB of 1 KiB"),
    count_case(1 * MiB, 16, "1 MiB of 16 B"),
    validate_case(1, 16, "FP32", "1x16 FP32"),
    validate_case(64, 16, "FP32", "64x16 FP32"),
    validate_case(4, 8, "BYTES", "4x8 BYTES of 32 B"),
]

HEADER = ["kernel", "size", "kernel time", "twin", "baseline", "ratio (baseline / kernel)"]


def row(case: Case, got: dict[str, float]) -> list[str]:
    twin = got.get("twin")
    return [case.kernel, case.size, format_time(got["kernel"]), "-" if twin is None else format_time(twin),
            f"{format_time(got['baseline'])} ({case.baseline_name})", f"{got['baseline'] / got['kernel']:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    arguments = parser.parse_args(argv)
    rounds, round_s = (3, 0.02) if arguments.quick else (7, 0.1)
    print(f"machine: {machine('numpy')}")
    rows = []
    for case in CASES:
        calls = {name: call for name in ("kernel", "twin") if (call := case.build(name)) is not None}
        calls["baseline"] = case.baseline()
        rows.append(row(case, best_time(calls, rounds, round_s)))
    print(table(HEADER, rows))
    return 0


# ---------------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def ratio_table(request):
    results: dict[str, dict[str, float]] = {}
    yield results
    rows = [row(case, got) for case in CASES if {"kernel", "baseline"} <= (got := results.get(case.name, {})).keys()]
    if rows:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n\nmachine: {machine('numpy')}\n{table(HEADER, rows)}")


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "_") for case in CASES])
@pytest.mark.parametrize("implementation", ["kernel", "twin", "baseline"])
def test_validation(benchmark, ratio_table, case, implementation):
    call = case.baseline() if implementation == "baseline" else case.build(implementation)
    if call is None:
        pytest.skip(f"{case.kernel} has no {implementation}")
    if implementation == "kernel" and case.kernel == "bytes_element_count":
        assert call() > 0  # a well-formed tensor: the walk counts its elements
    benchmark.group = case.name
    benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ratio_table.setdefault(case.name, {})[implementation] = benchmark.stats.stats.min


if __name__ == "__main__":
    sys.exit(main())
