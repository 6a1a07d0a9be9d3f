"""Hedged requests: when a backend has not answered within the model's observed p95, the same request
goes to a second backend as well, and the first answer wins (cf. "The Tail at Scale").

Off by default (`routing.hedge_after_p95`). Each model's recent backend latencies are a ring of
WINDOW samples whose 95th percentile is recomputed every RECOMPUTE_EVERY samples (a sort of
WINDOW floats, ~µs, amortized); no hedge is sent before MIN_SAMPLES are seen. A hedge is charged to
the retry budget (so hedging adds at most the budget's share of load) and only goes where a retry
could: not for a sequence's steps, never for decoupled models, never to the same backend.
"""

from __future__ import annotations

WINDOW = 256
RECOMPUTE_EVERY = 32
MIN_SAMPLES = 32


class LatencyWindow:
    """The recent backend latencies of one model (seconds) and their 95th percentile."""

    __slots__ = ("samples", "count", "p95")

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.count = 0
        self.p95: float | None = None  # None until MIN_SAMPLES were seen

    def __repr__(self) -> str:
        return f"<LatencyWindow n={self.count} p95={self.p95}>"

    def add(self, seconds: float) -> None:
        samples, count = self.samples, self.count
        if len(samples) < WINDOW:
            samples.append(seconds)
        else:
            samples[count % WINDOW] = seconds
        self.count = count = count + 1
        if count >= MIN_SAMPLES and count % RECOMPUTE_EVERY == 0:
            ordered = sorted(samples)
            self.p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class Hedging:
    """Per-model latency windows; `delay_of(entry)` is how long to wait before hedging (or None)."""

    def __init__(self, min_delay_s: float = 0.001) -> None:
        self.min_delay_s = min_delay_s
        self._windows: dict[object, LatencyWindow] = {}

    def __repr__(self) -> str:
        return f"<Hedging models={len(self._windows)}>"

    def window(self, entry) -> LatencyWindow:
        window = self._windows.get(entry)
        if window is None:
            window = self._windows[entry] = LatencyWindow()
        return window

    def delay_of(self, entry) -> float | None:
        p95 = self.window(entry).p95
        return None if p95 is None else max(p95, self.min_delay_s)
