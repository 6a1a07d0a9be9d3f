"""Drift kernels: Numba against their NumPy twins, and both against SciPy and NumPy on random data."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from gateway.ext.drift import (
    categorical,
    chi_square,
    histogram,
    jensen_shannon,
    ks,
    moments,
    psi,
    wasserstein,
)

SEEDS = [0, 1, 2]
SHAPES = [(1, 1), (64, 16), (2000, 3), (5000, 1)]
DISTRIBUTIONS = {
    "normal": lambda rng, shape, shift: rng.normal(shift, 1.0, shape),
    "lognormal": lambda rng, shape, shift: rng.lognormal(shift, 1.0, shape),
    "uniform": lambda rng, shape, shift: rng.uniform(shift, 1.0 + shift, shape),
    "cauchy": lambda rng, shape, shift: rng.standard_cauchy(shape) + shift,
    "discrete": lambda rng, shape, shift: rng.poisson(3.0 + 2 * shift, shape).astype(np.float64),
}


@pytest.fixture(params=["numba", "numpy"])
def twin(request):
    """Picks the kernel (`twin(module, name)`) or its NumPy twin."""
    suffix = "" if request.param == "numba" else "_numpy"
    return lambda module, name: getattr(module, name + suffix)


def histogram_of(update, edges, *blocks):
    counts = histogram.new_histogram(edges)
    for block in blocks:
        update(counts, edges, block)
    return counts


def samples(distribution, seed, rows, features, shift=0.0):
    return DISTRIBUTIONS[distribution](np.random.default_rng(seed), (rows, features), shift)


# ------------------------------------------------------------------------------------------ histogram

@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bins", [1, 2, 10, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_twins_agree(distribution, seed, shape, bins, dtype):
    edges = histogram.quantile_edges(samples(distribution, seed + 100, 500, shape[1]), bins)
    block = samples(distribution, seed, *shape, shift=0.3).astype(dtype)
    block.flat[::17] = np.nan
    block.flat[::23] = np.inf
    block.flat[::29] = -np.inf
    block.flat[::31] = -0.0
    got = histogram_of(histogram.update_histogram, edges, block)
    want = histogram_of(histogram.update_histogram_numpy, edges, block)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == block.size


def test_histogram_matches_numpy_histogram(twin):
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(1000, 4))
    block = rng.normal(size=(20000, 4)) * 0.5  # inside the reference range
    edges = histogram.quantile_edges(reference, 16)
    counts = histogram_of(twin(histogram, "update_histogram"), edges, block)
    for feature in range(4):
        inside = block[:, feature][(block[:, feature] >= edges[feature, 0]) & (block[:, feature] <= edges[feature, -1])]
        want, _ = np.histogram(inside, edges[feature])
        np.testing.assert_array_equal(counts[feature, :-4], want)


def test_histogram_columns(twin):
    edges = np.array([[0.0, 1.0, 2.0, 3.0]])
    block = np.array([[0.0], [0.5], [1.0], [2.999], [3.0], [-0.1], [3.1], [np.nan], [np.inf], [-np.inf], [-0.0]])
    counts = histogram_of(twin(histogram, "update_histogram"), edges, block)
    # bins [0,1) [1,2) [2,3]; below, above, NaN, inf
    np.testing.assert_array_equal(counts[0], [3, 1, 2, 1, 1, 1, 2])
    assert counts[0, histogram.NAN] == 1 and counts[0, histogram.INF] == 2


def test_merged_histograms_equal_histogram_of_concatenation(twin):
    rng = np.random.default_rng(4)
    edges = histogram.quantile_edges(rng.normal(size=(300, 5)), 10)
    first, second = rng.normal(size=(777, 5)), rng.normal(0.5, 2.0, size=(1234, 5))
    update = twin(histogram, "update_histogram")
    merged = histogram_of(update, edges, first) + histogram_of(update, edges, second)
    np.testing.assert_array_equal(merged, histogram_of(update, edges, np.concatenate([first, second])))


def test_histogram_empty_block(twin):
    edges = histogram.quantile_edges(np.random.default_rng(5).normal(size=(50, 3)), 8)
    for dtype in (np.float32, np.float64):
        counts = histogram_of(twin(histogram, "update_histogram"), edges, np.empty((0, 3), dtype))
        assert not counts.any()


def test_histogram_rejects_wrong_shapes(twin):
    edges = np.array([[0.0, 1.0, 2.0]])
    update = twin(histogram, "update_histogram")
    with pytest.raises(ValueError):
        update(np.zeros((1, 5), np.int64), edges, np.zeros((3, 1)))  # B + 4 = 6 columns needed
    with pytest.raises(ValueError):
        update(np.zeros((1, 6), np.int64), edges, np.zeros((3, 2)))  # block has 2 features


def test_infinite_outer_edges_keep_inf_apart(twin):
    edges = np.array([[-np.inf, -1.0, 0.0, 1.0, np.inf]])
    block = np.array([[-1e308], [-1.0], [-0.5], [0.0], [2.0], [1e308], [np.inf], [-np.inf], [np.nan]])
    counts = histogram_of(twin(histogram, "update_histogram"), edges, block)
    np.testing.assert_array_equal(counts[0], [1, 2, 1, 2, 0, 0, 1, 2])


def test_unsorted_edges_never_index_out_of_bounds():
    rng = np.random.default_rng(6)
    edges = rng.normal(size=(4, 11))
    edges[1, 3] = np.nan
    counts = histogram_of(histogram.update_histogram, edges, rng.normal(size=(5000, 4)))
    assert counts.sum() == 20000


def test_quantile_edges_strictly_increasing_in_degenerate_cases():
    rng = np.random.default_rng(7)
    reference = np.column_stack([
        np.full(100, 3.5),                    # constant
        rng.integers(0, 3, 100).astype(float),  # three atoms
        np.r_[rng.normal(size=3), np.full(97, np.nan)],  # fewer finite rows than bins
        np.full(100, np.nan),                 # nothing finite
        rng.normal(size=100),
    ])
    edges = histogram.quantile_edges(reference, 10)
    assert edges.shape == (5, 11)
    assert (np.diff(edges, axis=1) > 0).all()
    counts = histogram_of(histogram.update_histogram, edges, reference)
    assert counts[0, 0] == 100  # the constant has its own bin
    assert counts[1, :10].sum() == 100  # each atom lands inside the range
    few = histogram.quantile_edges(np.array([[1.0], [2.0]]), 10)  # 2 rows, 10 bins
    assert (np.diff(few) > 0).all() and few[0, 0] == 1.0 and few[0, -1] == 2.0


# ------------------------------------------------------------------------------------- divergences

def reference_and_current(distribution, seed, rows, features, bins, shift):
    reference = samples(distribution, seed, rows, features)
    current = samples(distribution, seed + 1000, rows // 2 + 1, features, shift)
    edges = histogram.quantile_edges(reference, bins)
    return (reference, current, edges,
            histogram_of(histogram.update_histogram, edges, reference),
            histogram_of(histogram.update_histogram, edges, current))


CONTINUOUS = ["normal", "lognormal", "uniform", "cauchy"]


def cdf_at_edges_of_samples(values, feature_edges):
    """F(e_i) counted on the raw values, not on a histogram: the share of the finite values left of
    each edge (< e_i), and at the last edge the share up to it (<= e_B), as the binned statistics
    define their CDFs (BELOW counts left of e_0; bin i is [e_i, e_i+1), the last bin closed)."""
    ordered = np.sort(values[np.isfinite(values)])
    left_of = np.searchsorted(ordered, feature_edges[:-1], side="left")
    up_to_last = np.searchsorted(ordered, feature_edges[-1:], side="right")
    return np.concatenate([left_of, up_to_last]) / ordered.size


def binned_wasserstein_by_refinement(cdf_reference, cdf_current, feature_edges) -> float:
    """The integral over [e_0, e_B] of |F_ref - F_cur|, both CDFs linear inside each bin, computed
    without the kernel's closed form: the grid of edges is refined with every point where the
    difference crosses zero, so |difference| is linear between grid points and the trapezoid rule
    is exact there."""
    difference = cdf_reference - cdf_current
    points, values = [feature_edges[0]], [difference[0]]
    for index in range(len(feature_edges) - 1):
        d0, d1 = difference[index], difference[index + 1]
        if d0 * d1 < 0:  # a zero strictly inside the bin
            left, right = feature_edges[index], feature_edges[index + 1]
            points.append(left + (right - left) * d0 / (d0 - d1))
            values.append(0.0)
        points.append(feature_edges[index + 1])
        values.append(d1)
    points, magnitudes = np.array(points), np.abs(np.array(values))
    return float(np.sum(np.diff(points) * (magnitudes[:-1] + magnitudes[1:]) / 2))


@pytest.mark.parametrize("distribution", CONTINUOUS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [8, 32])
@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0])
def test_ks_equals_the_largest_cdf_gap_at_the_edges(twin, distribution, seed, bins, shift):
    """Exactly the two-sample KS statistic restricted to the edges, counted on the raw samples."""
    reference, current, edges, reference_counts, current_counts = reference_and_current(distribution, seed, 4000, 3, bins, shift)
    got = twin(ks, "ks")(reference_counts, current_counts)
    for feature in range(3):
        gaps = (cdf_at_edges_of_samples(reference[:, feature], edges[feature])
                - cdf_at_edges_of_samples(current[:, feature], edges[feature]))
        assert got[feature] == pytest.approx(np.abs(gaps).max(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("distribution", CONTINUOUS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [8, 32])
@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0])
def test_ks_within_one_bin_of_scipy(twin, distribution, seed, bins, shift):
    reference, current, _, reference_counts, current_counts = reference_and_current(distribution, seed, 4000, 3, bins, shift)
    got = twin(ks, "ks")(reference_counts, current_counts)
    for feature in range(3):
        want = stats.ks_2samp(reference[:, feature], current[:, feature]).statistic
        shares = np.maximum(psi.fold_tails(reference_counts)[feature] / len(reference),
                            psi.fold_tails(current_counts)[feature] / len(current))
        assert got[feature] <= want + 1e-12
        assert want - got[feature] <= shares.max() + 1e-12


@pytest.mark.parametrize("distribution", CONTINUOUS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [8, 32])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_wasserstein_equals_the_integral_of_the_interpolated_cdfs(twin, distribution, seed, bins, shift):
    """The binned W1 of the docstring (CDFs exact at the edges, linear inside each bin), computed
    here from the raw samples by a different method, to the precision of the arithmetic."""
    reference, current, edges, reference_counts, current_counts = reference_and_current(distribution, seed, 4000, 3, bins, shift)
    got = twin(wasserstein, "wasserstein")(reference_counts, current_counts, edges)
    for feature in range(3):
        want = binned_wasserstein_by_refinement(cdf_at_edges_of_samples(reference[:, feature], edges[feature]),
                                                cdf_at_edges_of_samples(current[:, feature], edges[feature]),
                                                edges[feature])
        assert got[feature] == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("distribution", ["normal", "lognormal", "uniform"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [8, 32])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_wasserstein_within_the_binning_error_of_scipy(twin, distribution, seed, bins, shift):
    """Against SciPy on the samples, within what binning can change: spreading the values of a bin
    evenly over it moves each by at most half its width, so the two distances differ by at most
    sum_i (p_i + q_i) w_i / 2 (p, q: the bin shares; w: the widths). Out-of-range values sit at the
    edge they passed, in the histogram as in SciPy's clipped samples."""
    reference, current, edges, reference_counts, current_counts = reference_and_current(distribution, seed, 4000, 3, bins, shift)
    got = twin(wasserstein, "wasserstein")(reference_counts, current_counts, edges)
    for feature in range(3):
        clipped = np.clip(current[:, feature], edges[feature, 0], edges[feature, -1])
        want = stats.wasserstein_distance(reference[:, feature], clipped)
        shares = (reference_counts[feature, :bins] / reference_counts[feature, :bins + 2].sum()
                  + current_counts[feature, :bins] / current_counts[feature, :bins + 2].sum())
        binning_error = float(np.sum(shares * np.diff(edges[feature])) / 2)
        assert abs(got[feature] - want) <= binning_error + 1e-12


@pytest.mark.parametrize(("edges", "reference", "current", "want"), [
    # U[0, 2] against U[0, 1]: ∫|2u − u| du over the quantiles = 0.5
    ([0.0, 1.0, 2.0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], 0.5),
    # U[0,1] + U[2,3] (half each) against U[1, 2]: the CDFs cross inside the middle bin: 0.75
    # (a step CDF, or the trapezoid without the crossing, gives 1.0)
    ([0.0, 1.0, 2.0, 3.0], [1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], 0.75),
    # U[0, 2] against half at 0 (BELOW) and half at 2 (ABOVE); NaN and inf are left out: 0.5
    ([0.0, 1.0, 2.0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 5, 5], 0.5),
    # a whole bin's shift of width 3: 3
    ([0.0, 3.0, 6.0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], 3.0),
])
def test_wasserstein_of_known_distributions(twin, edges, reference, current, want):
    got = twin(wasserstein, "wasserstein")(np.array([reference]), np.array([current]), np.array([edges]))
    assert got[0] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_jensen_shannon_equals_scipy(twin, distribution, seed, shift):
    *_, reference_counts, current_counts = reference_and_current(distribution, seed, 3000, 4, 20, shift)
    got = twin(jensen_shannon, "jensen_shannon")(reference_counts, current_counts)
    folded_reference, folded_current = psi.fold_tails(reference_counts), psi.fold_tails(current_counts)
    want = [jensenshannon(folded_reference[f], folded_current[f]) for f in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def psi_formula(reference, current, epsilon=psi.EPSILON):
    p = np.maximum(reference / reference.sum(), epsilon)
    q = np.maximum(current / current.sum(), epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift", [0.0, 0.5, 2.0])
def test_psi_equals_direct_formula(twin, distribution, seed, shift):
    *_, reference_counts, current_counts = reference_and_current(distribution, seed, 3000, 4, 10, shift)
    got = twin(psi, "psi")(reference_counts, current_counts)
    folded_reference, folded_current = psi.fold_tails(reference_counts), psi.fold_tails(current_counts)
    want = [psi_formula(folded_reference[f], folded_current[f]) for f in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_chi_square_equals_scipy_contingency(twin, seed):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 50, (5, 12))
    current = rng.integers(0, 50, (5, 12))
    reference[:, 3] = current[:, 3] = 0  # an empty category is dropped
    got = twin(chi_square, "chi_square_table")(reference, current)
    for feature in range(5):
        table = np.stack([reference[feature], current[feature]])
        want = stats.chi2_contingency(table[:, table.sum(axis=0) > 0], correction=False)
        assert got[feature] == pytest.approx(want.statistic, rel=1e-12)
    statistic, pvalue = chi_square.chi_square_test(reference, current, histogram=False)
    want = stats.chi2_contingency(np.stack([reference[0], current[0]])[:, np.r_[0:3, 4:12]], correction=False)
    assert pvalue[0] == pytest.approx(want.pvalue, rel=1e-9)


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 30, 200])
def test_chi2_survival_equals_scipy(dof):
    """The p-value the runtime computes without SciPy, over the bulk and both tails."""
    for statistic in (1e-3, 0.5, dof / 2, dof, dof + 1, 2 * dof + 5, 5 * dof + 40):
        assert chi_square.chi2_survival(statistic, dof) == pytest.approx(stats.chi2.sf(statistic, dof), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("name", ["psi", "jensen_shannon", "ks", "chi_square", "wasserstein"])
@pytest.mark.parametrize("seed", SEEDS)
def test_divergence_twins_agree(name, seed):
    module = {"psi": psi, "jensen_shannon": jensen_shannon, "ks": ks, "chi_square": chi_square, "wasserstein": wasserstein}[name]
    reference, current, edges, reference_counts, current_counts = reference_and_current("normal", seed, 2000, 6, 12, 0.4)
    reference_counts[2] = 0  # a feature with nothing counted: NaN on both
    current_counts[3, :-2] = 0
    current_counts[3, -2:] = 7  # only NaN and inf: nothing counted either
    extra = (edges,) if name == "wasserstein" else ()
    got = getattr(module, name)(reference_counts, current_counts, *extra)
    want = getattr(module, name + "_numpy")(reference_counts, current_counts, *extra)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert np.isnan(got[2]) and np.isnan(got[3]) and np.isfinite(got[[0, 1, 4, 5]]).all()


def test_identical_histograms_have_no_drift(twin):
    *_, edges, counts, _ = reference_and_current("normal", 0, 1000, 3, 10, 0.0)
    for module, name in [(psi, "psi"), (jensen_shannon, "jensen_shannon"), (ks, "ks"), (chi_square, "chi_square")]:
        np.testing.assert_allclose(twin(module, name)(counts, counts), 0.0, atol=1e-12)
    np.testing.assert_allclose(twin(wasserstein, "wasserstein")(counts, counts, edges), 0.0, atol=1e-12)


# ------------------------------------------------------------------------------------------ moments

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES + [(0, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_equal_numpy_mean_and_var(twin, seed, shape, dtype):
    rng = np.random.default_rng(seed)
    blocks = [(rng.normal(5.0, 3.0, shape) + 1e6).astype(dtype) for _ in range(3)]
    for block in blocks:
        block.flat[::7] = np.nan
        block.flat[::11] = np.inf
    state = moments.new_moments(shape[1])
    update = twin(moments, "update_moments")
    for block in blocks:
        update(state, block)
    every = np.concatenate(blocks).astype(np.float64)
    for feature in range(shape[1]):
        finite = every[:, feature][np.isfinite(every[:, feature])]
        assert state[feature, moments.COUNT] == finite.size
        if finite.size:
            assert state[feature, moments.MEAN] == pytest.approx(finite.mean(), rel=1e-13)
            assert moments.variance(state)[feature] == pytest.approx(finite.var(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_merged_moments_equal_moments_of_concatenation(twin, seed):
    rng = np.random.default_rng(seed)
    first, second = rng.normal(0, 1, (500, 4)), rng.normal(10, 5, (1500, 4))
    update, merge = twin(moments, "update_moments"), twin(moments, "merge_moments")
    a = update(moments.new_moments(4), first)
    b = update(moments.new_moments(4), second)
    both = update(moments.new_moments(4), np.concatenate([first, second]))
    np.testing.assert_allclose(merge(a, b), both, rtol=1e-12)
    np.testing.assert_allclose(merge(moments.new_moments(4), b), b, rtol=0)  # empty is the identity


def test_moments_twins_agree():
    rng = np.random.default_rng(9)
    block = rng.standard_cauchy((3000, 7))
    block.flat[::5] = np.nan
    got = moments.update_moments(moments.new_moments(7), block)
    want = moments.update_moments_numpy(moments.new_moments(7), block)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# -------------------------------------------------------------------------------------- categorical

def raw_bytes(elements) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("seed", SEEDS)
def test_integer_buckets_twins_agree(dtype, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (1000, 3), dtype=dtype, endpoint=True)
    got = categorical.update_buckets(np.zeros((3, 17), np.int64), values)
    want = categorical.update_buckets_numpy(np.zeros((3, 17), np.int64), values)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == values.size


def test_integer_buckets_count_each_category_in_one_bucket(twin):
    values = np.repeat(np.arange(5), [1, 2, 3, 4, 5])[:, None]
    counts = twin(categorical, "update_buckets")(np.zeros((1, 1024), np.int64), values)
    assert sorted(counts[counts > 0].tolist()) == [1, 2, 3, 4, 5]  # no collisions among 5 in 1024 here


@pytest.mark.parametrize("seed", SEEDS)
def test_bytes_buckets_any_length(twin, seed):
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 3, 4, 5, 255, 256, 10_000] + rng.integers(0, 10_001, 16).tolist()
    elements = [rng.integers(0, 256, length, dtype=np.uint8).tobytes() for length in lengths]
    features = 4
    raw = raw_bytes(elements)
    counts = twin(categorical, "update_bytes_buckets")(np.zeros((features, 64), np.int64), categorical.as_raw(raw))
    want = np.zeros((features, 64), np.int64)
    for index, element in enumerate(elements):
        want[index % features, categorical.fnv1a64(element) % 64] += 1
    np.testing.assert_array_equal(counts, want)


def test_bytes_buckets_twins_agree_and_same_bytes_same_bucket():
    elements = [b"cat", b"dog", b"", b"cat", b"\x00" * 7, b"dog"] * 5
    raw = np.frombuffer(raw_bytes(elements), np.uint8)
    got = categorical.update_bytes_buckets(np.zeros((2, 8), np.int64), raw)
    want = categorical.update_bytes_buckets_numpy(np.zeros((2, 8), np.int64), raw)
    np.testing.assert_array_equal(got, want)
    assert categorical.fnv1a64(b"") == 0xCBF29CE484222325
    assert categorical.fnv1a64(b"a") == 0xAF63DC4C8601EC8C  # FNV-1a 64 test vector


@pytest.mark.parametrize("corrupt", [
    b"\x05\x00\x00\x00abc",           # length past the end
    b"\x01\x00\x00\x00a\x01\x00",     # truncated prefix
    b"\xff\xff\xff\xffabcd",          # huge length
    b"\x01\x00\x00\x00a",             # one element, two features
])
def test_corrupt_bytes_raise_and_count_nothing(twin, corrupt):
    counts = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError):
        twin(categorical, "update_bytes_buckets")(counts, categorical.as_raw(corrupt))
    assert not counts.any()


def test_empty_bytes_buffer(twin):
    counts = twin(categorical, "update_bytes_buckets")(np.zeros((2, 8), np.int64), categorical.as_raw(b""))
    assert not counts.any()


# ---------------------------------------------------------------------------------------- warm-up

def test_warm_up_compiles_every_kernel_the_gateway_calls():
    import gateway.ext.drift as drift

    if not drift.USING_EXTENSIONS:
        assert drift.warm_up() == 0.0 and drift.update_histogram is histogram.update_histogram_numpy
        return
    drift.warm_up()
    for name in drift.GATEWAY_KERNELS:
        assert getattr(drift.KERNELS[name], name).signatures, f"{name} was not compiled"
    for name, module in drift.KERNELS.items():
        assert callable(getattr(module, name + "_numpy"))
