"""Drift kernels (Numba) against their NumPy twins and a `numpy.histogram` baseline, measured in one run.

    python benchmarks/bench_drift.py [--quick] [--wall]     # the table below
    pytest benchmarks/bench_drift.py --benchmark-only       # the same cases under pytest-benchmark
                                                            # (add --benchmark-timer=time.process_time)

Each row times the Numba kernel, its NumPy twin and a baseline on the same data, back to back in
alternating rounds, and keeps each one's best round. Kernels are compiled (warm_up) before timing.
The clock is the process's CPU time (`time.process_time`) unless --wall: every call is single-threaded,
and on a shared machine wall time also counts the time the process waited for a core, which here
varied 2x from one second to the next while CPU time stayed within a few percent.
Targets for `update_histogram`, the per-request hot path:

  - large blocks (100k rows x 16 features): >= 5x faster than a loop of numpy.histogram per feature
    with the same edges, and <= 3 ns a value;
  - one 64-row x 16-feature block: >= 20x faster per call than the same numpy.histogram loop.

Other rows have no target (ratio = NumPy twin time / Numba time); they show what the rest costs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import gateway.ext.drift as drift
from gateway.bench.measure import best_time, format_time, machine, table
from gateway.ext.drift import categorical, histogram, jensen_shannon, ks, moments, psi, wasserstein

FEATURES = 16
HISTOGRAM_SPEEDUP_LARGE = 5.0
HISTOGRAM_SPEEDUP_SMALL = 20.0
NS_PER_VALUE_TARGET = 3.0


@functools.cache
def data(rows: int, bins: int, dtype: str, distribution: str = "normal"):
    """(edges from a 10k-row reference, a block of `rows` current rows, slightly shifted)."""
    rng = np.random.default_rng(rows + bins)
    draw = {"normal": lambda size, shift: rng.normal(shift, 1.0, size),
            "lognormal": lambda size, shift: rng.lognormal(shift, 1.0, size)}[distribution]
    edges = histogram.quantile_edges(draw((10_000, FEATURES), 0.0), bins)
    block = np.ascontiguousarray(draw((rows, FEATURES), 0.1).astype(dtype))
    return edges, block


def numpy_histogram_loop(edges, block):
    """The baseline: numpy.histogram of each feature's column against that feature's edges."""
    for feature in range(block.shape[1]):
        np.histogram(block[:, feature], edges[feature])


@dataclass(frozen=True)
class Case:
    """One row: a kernel call on fixed inputs, built for either twin, and the baseline it is judged against."""

    kernel: str
    size: str
    values: int  # values per call, for ns/value
    target: str  # "large", "small" or "" (none)
    build: Callable[[str], Callable[[], object]]  # "" (Numba) or "_numpy" -> the call to time
    baseline: Callable[[], Callable[[], object]] | None = None

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.size}"

    def target_text(self) -> str:
        return {"large": f">= {HISTOGRAM_SPEEDUP_LARGE:g}x, <= {NS_PER_VALUE_TARGET:g} ns/value",
                "small": f">= {HISTOGRAM_SPEEDUP_SMALL:g}x", "": "-"}[self.target]

    def met(self, numba_s: float, ratio: float) -> str:
        if not self.target:
            return ""
        if self.target == "large":
            ok = ratio >= HISTOGRAM_SPEEDUP_LARGE and numba_s / self.values * 1e9 <= NS_PER_VALUE_TARGET
        else:
            ok = ratio >= HISTOGRAM_SPEEDUP_SMALL
        return "met" if ok else "MISSED"


def histogram_case(rows: int, bins: int, dtype: str, target: str, distribution: str = "normal") -> Case:
    def build(suffix):
        edges, block = data(rows, bins, dtype, distribution)
        counts = histogram.new_histogram(edges)
        return functools.partial(getattr(histogram, "update_histogram" + suffix), counts, edges, block)

    size = f"{rows} x {FEATURES} {dtype}, B={bins}" + ("" if distribution == "normal" else f", {distribution}")
    return Case("update_histogram", size, rows * FEATURES, target, build,
                lambda: functools.partial(numpy_histogram_loop, *data(rows, bins, dtype, distribution)))


def cdf_case(rows: int, bins: int, dtype: str, target: str, distribution: str = "normal") -> Case:
    """update_cdf: the monitor's hot path since issue 16 (fine CDF bins, prebuilt cell table, tail sums)."""
    def build(suffix):
        edges, block = data(rows, bins, dtype, distribution)
        counts, tails = histogram.new_histogram(edges), np.zeros((FEATURES, 2))
        outer = np.zeros((FEATURES, max(64, 16 * rows // bins)))  # as the monitor sizes it for `rows` a sub-window
        return functools.partial(getattr(histogram, "update_cdf" + suffix), counts, tails, outer, edges,
                                 *histogram.cell_index(edges), block)

    size = f"{rows} x {FEATURES} {dtype}, B={bins}" + ("" if distribution == "normal" else f", {distribution}")
    return Case("update_cdf", size, rows * FEATURES, target, build,
                lambda: functools.partial(numpy_histogram_loop, *data(rows, bins, dtype, distribution)))


def moments_case(rows: int) -> Case:
    def build(suffix):
        _, block = data(rows, 20, "float32")
        return functools.partial(getattr(moments, "update_moments" + suffix), moments.new_moments(FEATURES), block)
    return Case("update_moments", f"{rows} x {FEATURES} float32", rows * FEATURES, "", build)


def buckets_case(rows: int) -> Case:
    def build(suffix):
        values = np.random.default_rng(1).integers(0, 1000, (rows, FEATURES))
        return functools.partial(getattr(categorical, "update_buckets" + suffix), np.zeros((FEATURES, 64), np.int64), values)
    return Case("update_buckets", f"{rows} x {FEATURES} int64, K=64", rows * FEATURES, "", build)


def bytes_case(rows: int, length: int) -> Case:
    def build(suffix):
        rng = np.random.default_rng(2)
        elements = [rng.integers(0, 256, length, dtype=np.uint8).tobytes() for _ in range(rows * FEATURES)]
        raw = np.frombuffer(b"".join(len(e).to_bytes(4, "little") + e for e in elements), np.uint8)
        return functools.partial(getattr(categorical, "update_bytes_buckets" + suffix), np.zeros((FEATURES, 64), np.int64), raw)
    return Case("update_bytes_buckets", f"{rows} x {FEATURES} x {length} B, K=64", rows * FEATURES, "", build)


def divergence_case(module, name: str, with_edges: bool = False) -> Case:
    def build(suffix):
        edges, block = data(100_000, 20, "float64")
        reference = histogram.update_histogram(histogram.new_histogram(edges), edges, block[:50_000])
        current = histogram.update_histogram(histogram.new_histogram(edges), edges, block[50_000:])
        arguments = (reference, current, edges) if with_edges else (reference, current)
        return functools.partial(getattr(module, name + suffix), *arguments)
    return Case(name, f"{FEATURES} features, B=20", FEATURES * 20, "", build)


CASES = [
    histogram_case(100_000, 20, "float64", "large"),
    histogram_case(100_000, 20, "float32", "large"),
    histogram_case(100_000, 10, "float64", "large"),
    histogram_case(100_000, 64, "float64", "large"),
    histogram_case(100_000, 20, "float64", "large", "lognormal"),
    histogram_case(64, 20, "float64", "small"),
    histogram_case(64, 20, "float32", "small"),
    histogram_case(64, 10, "float64", "small"),
    # issue 16: the monitor counts 16 bins x 16 = 256 fine bins with update_cdf; side by side with
    # update_histogram at the 16 bins it counted before, on the same machine in the same run
    histogram_case(100_000, 16, "float32", "large"),
    cdf_case(100_000, 256, "float32", "large"),
    cdf_case(100_000, 256, "float64", "large"),
    cdf_case(100_000, 256, "float32", "large", "lognormal"),
    histogram_case(64, 16, "float32", "small"),
    cdf_case(64, 256, "float32", "small"),
    moments_case(100_000),
    moments_case(64),
    buckets_case(64),
    bytes_case(64, 16),
    divergence_case(psi, "psi"),
    divergence_case(jensen_shannon, "jensen_shannon"),
    divergence_case(ks, "ks"),
    divergence_case(wasserstein, "wasserstein", with_edges=True),
]

ONLY = {"update_histogram", "update_cdf"}  # --only-histograms: the hot-path rows


# ------------------------------------------------------------------------------------------ measuring




def row(case: Case, got: dict[str, float]) -> list[str]:
    numba_s = got["numba"]
    if case.baseline is not None:
        ratio, baseline = got["baseline"] / numba_s, format_time(got["baseline"])
    else:
        ratio, baseline = got["twin"] / numba_s, "-"
    return [case.kernel, case.size, format_time(numba_s), f"{numba_s / case.values * 1e9:.2f}",
            format_time(got["twin"]) if "twin" in got else "-", baseline, f"{ratio:.1f}x",
            case.target_text(), case.met(numba_s, ratio)]


HEADER = ["kernel", "size", "Numba", "ns/value", "NumPy twin", "np.histogram loop", "ratio", "target", "result"]


FOOTNOTE = ("ratio = np.histogram loop time / Numba time where there is a baseline, else NumPy twin time / "
            "Numba time.\nns/value = Numba time / (rows x features) (for divergences: / (features x bins)).")


def calls_for(case: Case) -> dict[str, Callable[[], object]]:
    calls = {"numba": case.build(""), "twin": case.build("_numpy")}
    if case.baseline is not None:
        calls["baseline"] = case.baseline()
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--wall", action="store_true", help="time with the wall clock, not CPU time")
    parser.add_argument("--only-histograms", action="store_true", help="only the hot-path rows (update_histogram, update_cdf)")
    arguments = parser.parse_args(argv)
    rounds, round_s = (3, 0.02) if arguments.quick else (7, 0.1)
    clock = time.perf_counter if arguments.wall else time.process_time
    print(f"machine: {machine('numpy', 'numba')}")
    print(f"clock: {'wall (perf_counter)' if arguments.wall else 'CPU time of this process (process_time)'}")
    print(f"warm_up: {drift.warm_up():.3f} s (compiled code loaded from the disk cache when warm)")
    print(f"rounds: {rounds} x ~{round_s * 1e3:g} ms per implementation, best round kept\n", flush=True)
    cases = [case for case in CASES if case.kernel in ONLY] if arguments.only_histograms else CASES
    rows = [row(case, best_time(calls_for(case), rounds, round_s, clock)) for case in cases]
    print(table(HEADER, rows))
    print(FOOTNOTE)
    return 0


# ---------------------------------------------------------------------------------- pytest-benchmark

IMPLEMENTATIONS = ["numba", "twin", "baseline"]


@pytest.fixture(scope="module")
def ratio_table(request):
    """Collects each case's best times and prints the ratio table once the module's benchmarks are done."""
    drift.warm_up()
    results: dict[str, dict[str, float]] = {}
    yield results
    rows = [row(case, got) for case in CASES
            if {"numba", "twin"} <= (got := results.get(case.name, {})).keys()
            and (case.baseline is None or "baseline" in got)]
    if rows:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n\nmachine: {machine('numpy', 'numba')}\n{table(HEADER, rows)}\n{FOOTNOTE}")


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "_") for case in CASES])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernel(benchmark, ratio_table, case, implementation):
    if implementation == "baseline" and case.baseline is None:
        pytest.skip("no baseline for this kernel")
    benchmark.group = case.name
    call = {"numba": lambda: case.build(""), "twin": lambda: case.build("_numpy"), "baseline": case.baseline}[implementation]()
    benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ratio_table.setdefault(case.name, {})[implementation] = benchmark.stats.stats.min


if __name__ == "__main__":
    sys.exit(main())
