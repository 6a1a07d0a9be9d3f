"""Latency prediction per backend and the SLO gate per pool: where a request meets its objective.

A backend's predicted latency for the next request of a model is its EWMA service time times the
queue ahead of that request:

    predicted = service_s × (outstanding + 1)

`service_s` is learned from finished calls: a call that took `elapsed` with `ahead` requests already
in flight when it was sent contributes `elapsed / (ahead + 1)` (the time it cost per request in line,
as a single server in FIFO order would). The average is weighted by time, not by count
(w = exp(-Δt / tau)): a burst of answers moves it no faster than a trickle, and a sample after a
long silence (a probe of a pool traffic has left) counts almost fully.

A pool gate turns a pool's service time into a state with hysteresis: it closes when the pool's
best backend's service time alone (no queue) exceeds `spill_ratio` × the objective, and opens again
only once it falls below `return_ratio` × the objective — between the two, it stays as it was, so a
pool near its limit does not flap. An open pool still takes a request only when the request's own
prediction (with its queue) meets the objective; the excess spills request by request.

Everything here is a few float operations per request; nothing allocates.
"""

from __future__ import annotations

import math


class LatencyEstimate:
    """EWMA service time (seconds per request in line) of one model on one backend."""

    __slots__ = ("service_s", "updated", "samples", "gate", "peers")

    def __init__(self) -> None:
        self.service_s = 0.0  # 0 until the first observation: an unknown backend is predicted fast
        self.updated = 0.0
        self.samples = 0
        self.gate: PoolGate | None = None  # the gate of its pool for this model version (an objective is set)
        self.peers: list[LatencyEstimate] = []  # the estimates of its pool's backends, itself included

    def __repr__(self) -> str:
        return f"<LatencyEstimate service={self.service_s * 1e3:.2f}ms samples={self.samples}>"

    def observe(self, elapsed_s: float, ahead: int, now: float, tau_s: float) -> None:
        sample = elapsed_s / (ahead + 1)
        if self.samples:
            weight = math.exp((self.updated - now) / tau_s) if now > self.updated else 1.0
            self.service_s = self.service_s * weight + sample * (1.0 - weight)
        else:
            self.service_s = sample
        self.updated = now
        self.samples += 1

    def update_gate(self, now: float) -> None:
        """After an observation: close or open the pool's gate. The pool's best service time is
        only computed when this backend alone cannot decide (it is over the spill line while the
        gate is open): O(1) on the common path."""
        gate = self.gate
        if gate is None:
            return
        if gate.open:
            if self.service_s > gate.spill_s:
                gate.update(min(e.service_s for e in self.peers if e.samples), now)
        elif self.service_s < gate.return_s:
            gate.update(self.service_s, now)

    def predict(self, outstanding: int) -> float:
        """Seconds the next request would take with `outstanding` requests ahead of it."""
        return self.service_s * (outstanding + 1)


def load_score(estimate: LatencyEstimate, outstanding: int, now: float, tau_s: float) -> float:
    """Power of two choices compares this: the predicted latency, with the service time decaying
    towards zero while the backend goes unobserved (as linkerd's peak-EWMA does), so a backend whose
    last answers were slow — a cold start, a past hiccup — is tried again before long instead of
    starving for want of new samples; the outstanding requests it then gets raise its score again,
    so the retrial is a trickle, not a flood. A backend never observed scores by its outstanding
    requests alone, in tiny units."""
    if not estimate.samples:
        return (outstanding + 1) * 1e-9
    age = now - estimate.updated
    decay = math.exp(-age / tau_s) if age > tau_s else 1.0
    return (outstanding + 1) * max(estimate.service_s * decay, 1e-9)


class PoolGate:
    """Whether a pool keeps a model's objective, with hysteresis; when it does not, when to probe it.

    `open` is False while the pool is too slow for the objective; `probe_due(now)` says when a copy
    of a live request should measure it again (the probe's answer is discarded, so no client waits
    on a pool that is known to be slow).
    """

    __slots__ = ("pool", "open", "closed_at", "last_probe", "transitions", "spill_s", "return_s", "probe_interval_s")

    def __init__(self, pool: str, slo_s: float, spill_ratio: float, return_ratio: float, probe_interval_s: float) -> None:
        self.pool = pool
        self.open = True
        self.closed_at = 0.0
        self.last_probe = 0.0
        self.transitions = 0  # closes and re-opens: a flapping gate shows here
        self.spill_s = slo_s * spill_ratio
        self.return_s = slo_s * return_ratio
        self.probe_interval_s = probe_interval_s

    def __repr__(self) -> str:
        return f"<PoolGate {self.pool} {'open' if self.open else 'closed'} transitions={self.transitions}>"

    def update(self, service_s: float, now: float) -> None:
        """The pool's best service time changed: close above the spill line, open below the return line."""
        if self.open:
            if service_s > self.spill_s:
                self.open = False
                self.closed_at = self.last_probe = now
                self.transitions += 1
        elif service_s < self.return_s:
            self.open = True
            self.transitions += 1

    def probe_due(self, now: float) -> bool:
        if self.open or now - self.last_probe < self.probe_interval_s:
            return False
        self.last_probe = now
        return True
