"""Histograms kept on the hot path as plain ints, exported as OpenTelemetry histogram data points.

Bucket bounds are powers of 2^(1/2): the boundaries of OpenTelemetry's base-2 exponential histogram
at scale 1. Every gateway replica uses the same bounds, so histograms add up across replicas
bucket by bucket, in Prometheus (`sum by (le)`) or in a collector; and the same counts can be
handed to OTLP either as an explicit-bucket histogram (what Prometheus-bound pipelines read) or as
an exponential one (what OpenTelemetry-native backends merge at any scale) without re-binning.
Adjacent bounds differ by 41 %, so a percentile read from the buckets is within about ±20 %.

The counts themselves are `BucketCounts` (ext/histogram.pyx, a C binary search and four integer
updates a record); nothing takes a lock: the event loop thread writes, an exporter thread copies the
counts (under the GIL) and may be at most one observation behind.
"""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import Buckets, ExponentialHistogramDataPoint, HistogramDataPoint

from gateway.ext import BucketCounts

__all__ = ["BucketCounts", "DURATION_BOUNDS_NS", "DURATION_BOUNDS_S", "DURATION_FIRST_INDEX", "exponential_bounds",
           "exponential_point", "explicit_point"]

#: Exponential-histogram scale of the bounds: base = 2 ** (2 ** -SCALE) = √2.
SCALE = 1


def exponential_bounds(first_index: int, last_index: int) -> tuple[float, ...]:
    """Bounds base**i for i in [first_index, last_index] (base √2)."""
    return tuple(2.0 ** (i / 2**SCALE) for i in range(first_index, last_index + 1))


#: Durations: 2^-15 s (31 µs) .. 2^6 s (64 s), 43 bounds.
DURATION_FIRST_INDEX = -30
DURATION_BOUNDS_S = exponential_bounds(DURATION_FIRST_INDEX, 12)
DURATION_BOUNDS_NS = tuple(round(bound * 1e9) for bound in DURATION_BOUNDS_S)


def explicit_point(attributes: dict, counts: tuple[int, ...], total: float, minimum: float, maximum: float,
                   bounds: tuple[float, ...], start_ns: int, now_ns: int) -> HistogramDataPoint:
    return HistogramDataPoint(
        attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=sum(counts),
        sum=total, bucket_counts=counts, explicit_bounds=bounds, min=minimum, max=maximum,
    )


def exponential_point(attributes: dict, counts: tuple[int, ...], total: float, minimum: float, maximum: float,
                      first_index: int, start_ns: int, now_ns: int) -> ExponentialHistogramDataPoint:
    """The same counts as an exponential histogram at SCALE.

    Explicit bucket j covers (bound[j-1], bound[j]] = (base^(first+j-1), base^(first+j)]: exponential
    index first+j-1. The underflow bucket (≤ bound[0]) is reported one index lower and the overflow
    bucket one index higher than the range: OpenTelemetry's exponential histogram has no open-ended
    buckets (and the Python SDK no zero threshold); sum, min and max stay exact.
    """
    return ExponentialHistogramDataPoint(
        attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=sum(counts),
        sum=total, scale=SCALE, zero_count=0,
        positive=Buckets(offset=first_index - 1, bucket_counts=list(counts)),
        negative=Buckets(offset=0, bucket_counts=[]), flags=0, min=minimum, max=maximum, exemplars=[],
    )
