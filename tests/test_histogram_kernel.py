"""The histogram kernel (ext/histogram.pyx) and its Python twin: the same counts, sum, min and max."""

from __future__ import annotations

from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ext import histogram, histogram_py
from gateway.telemetry.histogram import DURATION_BOUNDS_NS

IMPLEMENTATIONS = pytest.mark.parametrize("kernel", [histogram, histogram_py], ids=["cython", "twin"])


def _expected(bounds, values):
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    return tuple(counts), sum(values), min(values, default=0), max(values, default=0)


@IMPLEMENTATIONS
def test_bounds_are_inclusive_upper_limits_with_an_overflow_bucket(kernel):
    counts = kernel.BucketCounts((10, 20, 30))
    for value in (-5, 0, 10, 11, 20, 21, 30, 31, 10**12):
        counts.record(value)
    assert counts.snapshot() == ((3, 2, 2, 2), -5 + 0 + 10 + 11 + 20 + 21 + 30 + 31 + 10**12, -5, 10**12)
    assert counts.count == 9


@IMPLEMENTATIONS
def test_an_empty_series_reads_zero(kernel):
    counts = kernel.BucketCounts(DURATION_BOUNDS_NS)
    assert counts.snapshot() == ((0,) * (len(DURATION_BOUNDS_NS) + 1), 0, 0, 0)
    assert counts.bounds == DURATION_BOUNDS_NS


@IMPLEMENTATIONS
def test_the_first_value_sets_min_and_max_even_when_it_is_zero(kernel):
    counts = kernel.BucketCounts((10,))
    counts.record(0)
    counts.record(5)
    assert counts.snapshot()[2:] == (0, 5)


@IMPLEMENTATIONS
def test_the_sum_stays_exact_past_64_bits(kernel):
    """A busy gateway's summed nanoseconds pass 2**63 within days: the sum must not wrap."""
    counts = kernel.BucketCounts(DURATION_BOUNDS_NS)
    value = 2**61 + 12345
    for _ in range(40):
        counts.record(value)
    assert counts.snapshot()[1] == 40 * value
    assert counts.snapshot()[0][-1] == 40  # all above the last bound


@IMPLEMENTATIONS
def test_bounds_must_ascend(kernel):
    with pytest.raises(ValueError, match="ascending"):
        kernel.BucketCounts((10, 10, 20))


@given(st.lists(st.integers(min_value=-(2**40), max_value=2**45), max_size=200))
def test_the_kernel_and_its_twin_agree(values):
    native, twin = histogram.BucketCounts(DURATION_BOUNDS_NS), histogram_py.BucketCounts(DURATION_BOUNDS_NS)
    for value in values:
        native.record(value)
        twin.record(value)
    assert native.snapshot() == twin.snapshot() == _expected(DURATION_BOUNDS_NS, values)
