"""Plain-Python twin of histogram.pyx, same signatures and results; used when extensions are off."""

from __future__ import annotations

from bisect import bisect_left


class BucketCounts:
    """Counts over `bounds` (ascending ints, each an inclusive upper limit; one overflow bucket
    above the last), with the sum, least and greatest value recorded."""

    __slots__ = ("bounds", "_counts", "_total", "_minimum", "_maximum", "_any")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(bounds)
        if any(later <= earlier for earlier, later in zip(self.bounds, self.bounds[1:])):
            raise ValueError("bounds must be strictly ascending")
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0
        self._minimum = 0
        self._maximum = 0
        self._any = False

    def record(self, value: int) -> None:
        """Count `value` in the first bucket whose bound is ≥ it (the overflow bucket above all)."""
        self._counts[bisect_left(self.bounds, value)] += 1
        if not self._any:
            self._any = True
            self._minimum = self._maximum = value
        elif value > self._maximum:
            self._maximum = value
        elif value < self._minimum:
            self._minimum = value
        self._total += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def snapshot(self) -> tuple[tuple[int, ...], int, int, int]:
        """(bucket counts, sum, min, max): one copy, so the count is the sum of exactly these buckets."""
        return tuple(self._counts), self._total, self._minimum, self._maximum
