"""Counters of one model's batching: batch sizes, queue delay, why each batch was sent."""

from __future__ import annotations

import collections


class BatchCounters:
    """Plain counters, updated once per batch; `snapshot()` is what the gateway snapshot and
    ModelStatistics report."""

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.requests = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.queue_delay_s_total = 0.0
        self.queue_delay_s_max = 0.0
        self.rejected_full = 0
        self.rejected_deadline = 0
        self.expired = 0
        self.held_saturated = 0  # times due batches were held: the model's backends had the most in flight

    def __repr__(self) -> str:
        mean = self.rows / self.batches if self.batches else 0.0
        return f"<BatchCounters batches={self.batches} mean_rows={mean:.1f} reasons={dict(self.reasons)}>"

    def record_batch(self, reason: str, rows: int, waits_s: list[float]) -> None:
        self.batches += 1
        self.rows += rows
        self.requests += len(waits_s)
        self.batch_sizes[rows] += 1
        self.reasons[reason] += 1
        self.queue_delay_s_total += sum(waits_s)
        self.queue_delay_s_max = max(self.queue_delay_s_max, max(waits_s))

    def snapshot(self) -> dict:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "rows": self.rows,
            "mean_batch_rows": self.rows / self.batches if self.batches else 0.0,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "reasons": dict(self.reasons),
            "mean_queue_delay_us": 1e6 * self.queue_delay_s_total / self.requests if self.requests else 0.0,
            "max_queue_delay_us": 1e6 * self.queue_delay_s_max,
            "rejected_queue_full": self.rejected_full,
            "rejected_deadline": self.rejected_deadline,
            "expired_in_queue": self.expired,
            "held_saturated": self.held_saturated,
        }
