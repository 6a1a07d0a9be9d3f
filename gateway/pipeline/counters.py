"""Per-model request counters kept by the gateway itself (its own part of ModelStatistics)."""

from __future__ import annotations

import time


class RequestCounters:
    """Counters of one (model, version) at the gateway; plain ints, updated once per request."""

    __slots__ = ("success_count", "success_ns", "fail_count", "fail_ns", "last_inference_ms")

    def __init__(self) -> None:
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.last_inference_ms = 0

    def record(self, ok: bool, elapsed_ns: int) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns
        self.last_inference_ms = int(time.time() * 1000)

    def __repr__(self) -> str:
        return f"<RequestCounters ok={self.success_count} failed={self.fail_count}>"
