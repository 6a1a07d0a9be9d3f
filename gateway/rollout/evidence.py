"""What a rollout judges a candidate by: its answers beside the live version's, and the checks.

Each version's live traffic during the rollout is recorded here (requests, errors by status,
latencies of its answers), and both versions' outputs on shared bins (traffic/stats.py's
OutputComparison: the live side learns the edges, the candidate is its second side). `judge`
turns them into checks, each {check, ok, value, limit}: ok is None while there is too little
evidence to say.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.rollout.config import RolloutConfig
from gateway.traffic.stats import OutputComparison

MAX_LATENCIES = 20_000  # per version: the latest answers' latencies (enough for a p99)


class VersionEvidence:
    """One version's requests during a rollout: counts, errors by status, latencies of answers."""

    __slots__ = ("requests", "errors", "statuses", "_latencies", "_next")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.statuses: dict[str, int] = {}
        self._latencies = np.zeros(MAX_LATENCIES)
        self._next = 0  # answers recorded (the ring holds the last MAX_LATENCIES)

    def __repr__(self) -> str:
        return f"<VersionEvidence requests={self.requests} errors={self.errors}>"

    def record(self, seconds: float, error) -> None:
        self.requests += 1
        if error is not None:
            self.errors += 1
            status = getattr(getattr(error, "code", None), "name", None) or type(error).__name__
            self.statuses[status] = self.statuses.get(status, 0) + 1
            return
        self._latencies[self._next % MAX_LATENCIES] = seconds
        self._next += 1

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p99_ms(self, skip: int = 0) -> float | None:
        """p99 of the answers' latencies, leaving out the first `skip` (a just-loaded version's first
        answers pay its warm-up) until the ring has wrapped."""
        answered = self._latencies[min(skip, self._next):self._next] if self._next <= MAX_LATENCIES else self._latencies
        return float(np.percentile(answered, 99) * 1e3) if len(answered) else None

    def summary(self) -> dict:
        p99 = self.p99_ms()
        return {"requests": self.requests, "errors": self.errors, "statuses": dict(self.statuses),
                "error_rate": None if self.error_rate is None else round(self.error_rate, 6),
                "p99_ms": None if p99 is None else round(p99, 3)}


def judge(config: RolloutConfig, slo_ms: float | None, live: VersionEvidence, candidate: VersionEvidence,
          outputs: OutputComparison) -> list[dict]:
    """The checks of a candidate against the live version (see the module docstring)."""
    checks = []
    enough = candidate.requests >= config.min_evidence
    live_rate = live.error_rate or 0.0
    limit = live_rate + config.max_error_rate_increase
    rate = candidate.error_rate
    checks.append({"check": "error_rate", "ok": (rate <= limit) if enough else None,
                   "value": rate, "limit": round(limit, 6)})
    answered = candidate.requests - candidate.errors
    p99, live_p99 = candidate.p99_ms(config.warmup_answers), live.p99_ms()
    latency_limit = None if live_p99 is None else config.latency_ratio * live_p99 + 1.0
    if latency_limit is not None and slo_ms is not None:
        latency_limit = max(latency_limit, slo_ms)
    judged = answered >= config.min_latency_evidence + config.warmup_answers and p99 is not None and latency_limit is not None
    checks.append({"check": "latency_p99_ms", "ok": (p99 <= latency_limit) if judged else None,
                   "value": p99, "limit": latency_limit, "slo_ms": slo_ms, "live_p99_ms": live_p99})
    compared = outputs.summary().get("compared", {}).get("shadow", {})  # the candidate's side against live
    psi = compared.get("psi")
    seen = (int(outputs.live.sum()) if outputs.live is not None else 0,
            int(outputs.shadow.sum()) if outputs.shadow is not None else 0)
    judged = psi is not None and min(seen) >= config.min_output_values and not math.isnan(psi)
    checks.append({"check": "output_psi", "ok": (psi <= config.max_output_psi) if judged else None,
                   "value": psi, "limit": config.max_output_psi, "ks": compared.get("ks"),
                   "values": {"live": seen[0], "candidate": seen[1]}})
    return checks


def failed(checks: list[dict]) -> list[dict]:
    return [check for check in checks if check["ok"] is False]


class ShadowEvidence:
    """A shadow's TrafficCounters read as VersionEvidence (p99 at its histogram's bucket bound)."""

    def __init__(self, counters) -> None:
        self._counters = counters

    @property
    def requests(self) -> int:
        return self._counters.requests

    @property
    def errors(self) -> int:
        return self._counters.errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p99_ms(self, skip: int = 0) -> float | None:
        p99 = self._counters.latency.percentile(0.99)
        return None if p99 is None else p99 * 1e3

    def summary(self) -> dict:
        return {**self._counters.summary(), "p99_ms": self.p99_ms()}
