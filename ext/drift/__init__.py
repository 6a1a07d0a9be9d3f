"""Drift statistics of monitored tensors: Numba kernels, each with a plain NumPy twin of the same signature.

On the hot path (one call per request or batch block, `nogil`, in place):
    update_histogram(counts, edges, block)     binned counts + below / above / NaN / inf   histogram.py
    update_cdf(counts, tails, outer, edges, *cell_index(edges), block)
                                               the same with a prebuilt cell table, the sums of the
                                               outer bins' values and those values (fine CDF bins)  histogram.py
    update_bytes_buckets(counts, raw)          hashed buckets of KServe BYTES elements     categorical.py
Library kernels the gateway does not call (offline analysis, tests; compiled on first use, not at start):
    update_moments(state, block)               running count, mean, M2 (Welford / Chan)    moments.py
    update_buckets(counts, values)             hashed buckets of integer categories        categorical.py
When a window closes, one call per statistic, float64[F] out:
    population_stability_index, jensen_shannon_distance, ks_statistic, wasserstein_distance,
    wasserstein_distance_tails, chi_square_statistic, chi_square_goodness (histograms int64[F, B+4];
    modules psi, jensen_shannon, ks, wasserstein, chi_square); psi_table, jensen_shannon_table,
    chi_square_table, chi_square_goodness_table (frequency tables int64[F, K]).
p-values without SciPy (plain Python, per feature): ks_pvalue, chi2_survival.

`TENSORGATE_NO_EXTENSIONS=1` exports the `*_numpy` twins under the same names (as gateway.ext does).
Kernels compile on first call and are cached on disk (`cache=True`, in this package's __pycache__);
`warm_up()` compiles every kernel the gateway calls, for the dtypes it feeds them, so no request
pays for it.
"""

from __future__ import annotations

import time

import numpy as np

from gateway.ext import USING_EXTENSIONS
from gateway.ext.drift import categorical, chi_square, histogram, jensen_shannon, ks, moments, psi, wasserstein
from gateway.ext.drift.categorical import as_raw
from gateway.ext.drift.chi_square import chi_square_test
from gateway.ext.drift.chi_square import chi2_survival, degrees_of_freedom
from gateway.ext.drift.histogram import (ABOVE, BELOW, EXTRA_COLUMNS, INF, NAN, cell_index, coarsen, fold_tails,
                                         new_histogram, quantile_edges)
from gateway.ext.drift.ks import ks_pvalue, ks_pvalue_given_reference
from gateway.ext.drift.moments import new_moments, variance

KERNELS = {  # Numba kernel name -> its module; the twin is the same name + "_numpy" in the same module
    "update_histogram": histogram,
    "update_cdf": histogram,
    "update_moments": moments,
    "merge_moments": moments,
    "update_buckets": categorical,
    "update_bytes_buckets": categorical,
    "psi": psi,
    "psi_table": psi,
    "jensen_shannon": jensen_shannon,
    "jensen_shannon_table": jensen_shannon,
    "ks": ks,
    "wasserstein": wasserstein,
    "wasserstein_tails": wasserstein,
    "wasserstein_inner": wasserstein,
    "outer_regions_exact": wasserstein,
    "chi_square": chi_square,
    "chi_square_goodness": chi_square,
    "chi_square_goodness_table": chi_square,
    "chi2_survival_many": chi_square,
    "chi_square_table": chi_square,
}

#: The kernels the gateway calls, which warm_up() compiles at start; the others compile on first use.
GATEWAY_KERNELS = frozenset(KERNELS) - {"update_moments", "merge_moments", "update_buckets"}

_suffix = "" if USING_EXTENSIONS else "_numpy"
update_histogram = getattr(histogram, "update_histogram" + _suffix)
update_cdf = getattr(histogram, "update_cdf" + _suffix)
update_moments = getattr(moments, "update_moments" + _suffix)
merge_moments = getattr(moments, "merge_moments" + _suffix)
update_buckets = getattr(categorical, "update_buckets" + _suffix)
update_bytes_buckets = getattr(categorical, "update_bytes_buckets" + _suffix)
# The histogram statistics take longer names: the short ones are their modules.
population_stability_index = getattr(psi, "psi" + _suffix)
psi_table = getattr(psi, "psi_table" + _suffix)
jensen_shannon_distance = getattr(jensen_shannon, "jensen_shannon" + _suffix)
jensen_shannon_table = getattr(jensen_shannon, "jensen_shannon_table" + _suffix)
ks_statistic = getattr(ks, "ks" + _suffix)
wasserstein_distance = getattr(wasserstein, "wasserstein" + _suffix)
wasserstein_distance_tails = getattr(wasserstein, "wasserstein_tails" + _suffix)
wasserstein_inner = getattr(wasserstein, "wasserstein_inner" + _suffix)
outer_regions_exact = getattr(wasserstein, "outer_regions_exact" + _suffix)
chi_square_statistic = getattr(chi_square, "chi_square" + _suffix)
chi_square_goodness = getattr(chi_square, "chi_square_goodness" + _suffix)
chi_square_goodness_table = getattr(chi_square, "chi_square_goodness_table" + _suffix)
chi2_survival_many = getattr(chi_square, "chi2_survival_many" + _suffix)
chi_square_table = getattr(chi_square, "chi_square_table" + _suffix)


def warm_up() -> float:
    """Compile (or load from the disk cache) every kernel the gateway calls, for its argument types.

    Blocks: float32 and float64, C-contiguous, writable and read-only (np.frombuffer over a request's
    raw contents is read-only, a distinct Numba type); BYTES as a read-only or writable uint8
    buffer. Returns the seconds it took. A no-op under TENSORGATE_NO_EXTENSIONS=1.
    """
    started = time.perf_counter()
    if not USING_EXTENSIONS:
        return 0.0
    features, bins, buckets = 2, 4, 8
    edges = histogram.quantile_edges(np.arange(8.0).reshape(4, 2), bins)
    counts = new_histogram(edges)
    for dtype in (np.float32, np.float64):
        block = np.zeros((3, features), dtype)
        for variant in (block, _read_only(block)):
            histogram.update_histogram(counts, edges, variant)
            histogram.update_cdf(counts, np.zeros((features, 2)), np.zeros((features, 8)), edges, *cell_index(edges), variant)
    table = np.ones((features, buckets), np.int64)
    raw = b"\x01\x00\x00\x00a\x00\x00\x00\x00"
    categorical.update_bytes_buckets(table, np.frombuffer(raw, np.uint8))
    categorical.update_bytes_buckets(table, np.frombuffer(bytearray(raw), np.uint8))
    for histograms in (psi.psi, jensen_shannon.jensen_shannon, ks.ks, chi_square.chi_square):
        histograms(counts, counts)
    chi_square.chi_square_goodness(counts, counts)
    wasserstein.wasserstein(counts, counts, edges)
    wasserstein.wasserstein_tails(counts, counts, edges, np.zeros((features, 2)), np.zeros((features, 2)))
    wasserstein.wasserstein_inner(counts, counts, edges)
    chi_square.chi2_survival_many(np.zeros(features), np.ones(features, np.int64))
    wasserstein.outer_regions_exact(np.zeros(3), np.zeros(2), 3.0, 2.0, 0.5, 1.5)
    for tables in (psi.psi_table, jensen_shannon.jensen_shannon_table, chi_square.chi_square_table,
                   chi_square.chi_square_goodness_table):
        tables(table, table)
    return time.perf_counter() - started


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


__all__ = [
    "ABOVE", "BELOW", "EXTRA_COLUMNS", "GATEWAY_KERNELS", "INF", "KERNELS", "NAN", "USING_EXTENSIONS",
    "as_raw", "cell_index", "chi2_survival", "chi2_survival_many", "chi_square_goodness", "chi_square_goodness_table",
    "chi_square_statistic", "chi_square_table", "chi_square_test", "coarsen", "degrees_of_freedom", "fold_tails",
    "ks_pvalue", "ks_pvalue_given_reference", "outer_regions_exact", "update_cdf", "wasserstein_inner", "wasserstein_distance_tails",
    "jensen_shannon_distance", "jensen_shannon_table", "ks_statistic", "merge_moments", "new_histogram",
    "new_moments", "population_stability_index", "psi_table", "quantile_edges", "update_buckets",
    "update_bytes_buckets", "update_histogram", "update_moments", "variance", "warm_up",
    "wasserstein_distance",
]
