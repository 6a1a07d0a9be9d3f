"""Batching kernels against their NumPy twins and `numpy.copyto`, measured in one run.

    python benchmarks/bench_kernels.py [--quick]              # the table below
    pytest benchmarks/bench_kernels.py --benchmark-only       # the same cases under pytest-benchmark

Each row times the Cython kernel, its NumPy/Python twin and a baseline on the same bytes, back to
back in alternating rounds, and keeps each one's best round (timeit's advice: slower rounds are
noise from elsewhere). The targets:

  - gather / gather_into of >= 1 MiB: bandwidth >= 0.8x numpy.copyto of the same number of bytes
    between two preallocated arrays (ratio = copyto time / kernel time);
  - gather of one 64-byte tensor: <= 2 us per call (the per-call overhead);
  - typed_to_raw of 16 FP32 values from a protobuf repeated field: faster than
    `np.asarray(values, np.float32).tobytes()` (ratio = NumPy time / kernel time).

scatter and scatter_bytes copy nothing: they return memoryview slices of the batch, one per
request (scatter_bytes walks the length prefixes to find where each request's elements end). Set
against a copy of the same bytes they would look hundreds of times "faster" the larger the batch,
which measures nothing, so their rows have no copy baseline and no target: they show the time per
call and per view, and the ratio to the Python twin doing the same slicing.

All data is random and written before timing: calloc'd zero pages would make copies look free.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from gateway.bench.measure import best_time, format_time, machine, table
from gateway.ext import batching, batching_py
from gateway.protocol import pb

KiB = 1024
MiB = 1024 * KiB
BANDWIDTH_TARGET = 0.8
LATENCY_TARGET_S = 2e-6
SPEEDUP_TARGET = 1.0


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def copyto_baseline(size: int) -> Callable[[], object]:
    """numpy.copyto of `size` bytes between two preallocated, already-touched arrays."""
    source = np.frombuffer(random_bytes(size, seed=1), np.uint8).copy()
    destination = np.ones_like(source)
    return functools.partial(np.copyto, destination, source)


def fp32_field():
    contents = pb.InferTensorContents()
    contents.fp32_contents.extend(np.random.default_rng(2).random(16, np.float32).tolist())
    return contents.fp32_contents


@dataclass(frozen=True)
class Case:
    """One row: a kernel call on fixed inputs, built for either twin, and the baseline it is judged against."""

    kernel: str
    size: str
    target: str  # "bandwidth", "latency", "speedup" or "zero-copy" (no baseline, no target)
    build: Callable[[object], Callable[[], object]]  # implementation module -> the call to time
    build_baseline: Callable[[], Callable[[], object]] | None
    baseline_name: str = "numpy.copyto"
    views: int = 0  # zero-copy rows: views each call returns

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.size}"

    def target_text(self) -> str:
        return {
            "bandwidth": f">= {BANDWIDTH_TARGET}x copyto",
            "latency": f"<= {LATENCY_TARGET_S * 1e6:g} us/call",
            "speedup": f">= {SPEEDUP_TARGET:g}x np.asarray",
            "zero-copy": "none (views, no copy)",
        }[self.target]

    def ratio(self, kernel_s: float, baseline_s: float) -> float:
        return baseline_s / kernel_s

    def met(self, kernel_s: float, baseline_s: float) -> bool:
        if self.target == "latency":
            return kernel_s <= LATENCY_TARGET_S
        threshold = BANDWIDTH_TARGET if self.target == "bandwidth" else SPEEDUP_TARGET
        return self.ratio(kernel_s, baseline_s) >= threshold


@functools.cache
def parts_of(total: int, count: int) -> list[bytes]:
    return [random_bytes(total // count, seed=index) for index in range(count)]


@functools.cache
def bytes_batch(total: int, element_bytes: int, requests: int) -> tuple[bytes, list[int]]:
    """A raw BYTES batch of about `total` bytes (length prefixes included), split evenly over `requests`."""
    elements = total // (element_bytes + 4)
    element = random_bytes(element_bytes)
    raw = batching.bytes_typed_to_raw([element] * elements)
    counts = [elements // requests] * requests
    counts[-1] += elements - sum(counts)
    return raw, counts


def gather_case(total: int, count: int, label: str, target: str = "bandwidth") -> Case:
    return Case("gather", label, target, lambda kernels: functools.partial(kernels.gather, parts_of(total, count)),
                functools.partial(copyto_baseline, total))


def gather_into_case(total: int, count: int, label: str) -> Case:
    def build(kernels):
        out = bytearray(random_bytes(total, seed=3))
        return functools.partial(kernels.gather_into, parts_of(total, count), out)
    return Case("gather_into", label, "bandwidth", build, functools.partial(copyto_baseline, total))


def scatter_case(total: int, requests: int, label: str) -> Case:
    def build(kernels):
        batch = bytearray(random_bytes(total, seed=4))
        return functools.partial(kernels.scatter, batch, [1] * requests, total // requests)
    return Case("scatter", label, "zero-copy", build, None, baseline_name="", views=requests)


def scatter_bytes_case(total: int, element_bytes: int, requests: int, label: str) -> Case:
    def build(kernels):
        raw, counts = bytes_batch(total, element_bytes, requests)
        return functools.partial(kernels.scatter_bytes, raw, counts)
    return Case("scatter_bytes", label, "zero-copy", build, None, baseline_name="", views=requests)


def typed_case(label: str, values_factory: Callable[[], object]) -> Case:
    def build(kernels):
        return functools.partial(kernels.typed_to_raw, values_factory(), "FP32")

    def baseline():
        values = values_factory()
        return lambda: np.asarray(values, np.float32).tobytes()
    return Case("typed_to_raw", label, "speedup", build, baseline, baseline_name="np.asarray().tobytes()")


CASES = [
    gather_case(64, 1, "64 B x 1", target="latency"),
    gather_case(1 * MiB, 64, "1 MiB = 64 x 16 KiB"),
    gather_case(1 * MiB, 1024, "1 MiB = 1024 x 1 KiB"),
    gather_case(16 * MiB, 64, "16 MiB = 64 x 256 KiB"),
    gather_case(64 * MiB, 64, "64 MiB = 64 x 1 MiB"),
    gather_into_case(1 * MiB, 64, "1 MiB = 64 x 16 KiB"),
    gather_into_case(16 * MiB, 64, "16 MiB = 64 x 256 KiB"),
    gather_into_case(64 * MiB, 64, "64 MiB = 64 x 1 MiB"),
    scatter_case(1 * MiB, 64, "1 MiB -> 64 requests"),
    scatter_case(1 * MiB, 1024, "1 MiB -> 1024 requests"),
    scatter_case(16 * MiB, 64, "16 MiB -> 64 requests"),
    scatter_case(64 * MiB, 64, "64 MiB -> 64 requests"),
    scatter_bytes_case(1 * MiB, 1 * KiB, 64, "1 MiB of 1 KiB -> 64 req"),
    scatter_bytes_case(16 * MiB, 1 * KiB, 64, "16 MiB of 1 KiB -> 64 req"),
    scatter_bytes_case(1 * MiB, 64, 64, "1 MiB of 64 B -> 64 req"),
    typed_case("16 FP32, pb repeated", fp32_field),
    typed_case("16 FP32, list", lambda: list(fp32_field())),
]


# ------------------------------------------------------------------------------------------ measuring




def row(case: Case, cython_s: float, twin_s: float | None, baseline_s: float | None) -> list[str]:
    twin = "-" if twin_s is None else format_time(twin_s)
    if case.target == "zero-copy":
        ratio = "-" if twin_s is None else f"{twin_s / cython_s:.2f}x twin"
        return [case.kernel, case.size, format_time(cython_s), twin, "- (no copy)", ratio, case.target_text(),
                f"{format_time(cython_s / case.views)}/view"]
    baseline = format_time(baseline_s) + ("" if case.baseline_name == "numpy.copyto" else " *")
    return [
        case.kernel, case.size, format_time(cython_s), twin, baseline,
        f"{case.ratio(cython_s, baseline_s):.2f}x", case.target_text(), "met" if case.met(cython_s, baseline_s) else "MISSED",
    ]


HEADER = ["kernel", "size", "Cython", "NumPy twin", "copyto baseline", "ratio", "target", "result"]


FOOTNOTE = (
    "ratio = baseline time / Cython time (for bandwidth rows: Cython bandwidth / copyto bandwidth).\n"
    "* baseline is np.asarray(values, np.float32).tobytes() on the same values, not copyto.\n"
    "scatter, scatter_bytes: zero-copy views of the batch, no bytes copied, so no copy baseline and no target;\n"
    "  ratio = Python twin time / Cython time for the same views, result = Cython time per view (per request)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    arguments = parser.parse_args(argv)
    rounds, round_s = (3, 0.02) if arguments.quick else (7, 0.1)
    print(f"machine: {machine('numpy')}")
    print(f"rounds: {rounds} x ~{round_s * 1e3:g} ms per implementation, best round kept\n", flush=True)
    rows = []
    for case in CASES:
        calls = {"cython": case.build(batching), "twin": case.build(batching_py)}
        if case.build_baseline is not None:
            calls["baseline"] = case.build_baseline()
        best = best_time(calls, rounds, round_s)
        rows.append(row(case, best["cython"], best["twin"], best.get("baseline")))
    print(table(HEADER, rows))
    print(FOOTNOTE)
    return 0


# ---------------------------------------------------------------------------------- pytest-benchmark

IMPLEMENTATIONS = {"cython": lambda case: case.build(batching), "twin": lambda case: case.build(batching_py),
                   "baseline": lambda case: case.build_baseline() if case.build_baseline is not None else None}


@pytest.fixture(scope="module")
def ratio_table(request):
    """Collects each case's best times and prints the ratio table once the module's benchmarks are done."""
    results: dict[str, dict[str, float]] = {}
    yield results
    rows = [row(case, got["cython"], got.get("twin"), got.get("baseline"))
            for case in CASES if "cython" in (got := results.get(case.name, {}))
            and ("baseline" in got or case.build_baseline is None)]
    if rows:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n\nmachine: {machine('numpy')}\n{table(HEADER, rows)}\n{FOOTNOTE}")


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "_") for case in CASES])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_kernel(benchmark, ratio_table, case, implementation):
    call = IMPLEMENTATIONS[implementation](case)
    if call is None:
        pytest.skip(f"{case.name} has no {implementation}: it copies nothing")
    benchmark.group = case.name
    benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ratio_table.setdefault(case.name, {})[implementation] = benchmark.stats.stats.min


if __name__ == "__main__":
    sys.exit(main())
