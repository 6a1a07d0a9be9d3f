"""Passive outlier ejection: backends whose requests fail in a row, or stall, leave rotation for a while.

The policy (cf. Envoy's outlier detection, `outlier_detection_impl.h`):

    failures   `consecutive_failures` outright failures in a row (the backend counts them on its
               own path: Backend._failed_to_answer) → the backend reports itself (`on_outlier`)
    stall      requests outstanding and no answer for `stall_after_s`, and an active health check
               failed (timed out) meanwhile: a hung backend never fails, so it must be seen by what
               does not happen. A backend busy with one long request still answers its health
               checks (Triton's frontend threads are not its model instances), so it is not
               ejected; nor is one with no other backend in rotation (there is nowhere to move
               its requests). Found by a sweep every `interval_s` that compares each backend's
               answer count with the last sweep's; nothing is timed per request
    eject      unless `max_ejected_percent` of its pool (at least one backend) are ejected already;
               the router stops choosing it at once (the fleet's change listeners), then what is
               pending on it is failed over (Backend.abandon_pending: retryable Abandoned)
    readmit    after base_ejection_s × 2^(ejections in a row − 1) (at most max_ejection_s), on the
               first successful active health check after that; a backend that then stays in
               rotation for max_ejection_s starts again from base_ejection_s

Counters (`ejections`, `ejections_by_reason`, `ejections_refused`, `readmissions`,
`requests_failed_over`) are read by telemetry and the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from gateway.upstream.backend import Backend
from gateway.upstream.config import OutlierConfig

log = logging.getLogger(__name__)

FAILURES, STALL = "consecutive_failures", "stall"


class _Watch:
    """What the detector remembers about one backend between sweeps."""

    __slots__ = ("answers", "since", "until", "in_a_row", "readmitted_at")

    def __init__(self) -> None:
        self.answers = -1  # served + failed at the last sweep
        self.since = 0.0  # when that count last changed (or nothing was outstanding)
        self.until = 0.0  # the current ejection's end
        self.in_a_row = 0  # ejections in a row (the exponent of the next one's length)
        self.readmitted_at = 0.0


class OutlierDetector:
    """Ejects and readmits the backends of `pools` by the OutlierConfig policy."""

    def __init__(self, config: OutlierConfig, pools: dict[str, list[Backend]], changed: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._pools = pools
        self._changed = changed
        self._clock = clock
        self._watches: dict[Backend, _Watch] = {}
        self.ejections = 0
        self.ejections_by_reason: dict[str, int] = {FAILURES: 0, STALL: 0}
        self.ejections_refused = 0  # wanted, but the pool's cap was reached
        self.readmissions = 0
        self.requests_failed_over = 0  # pending requests failed over from ejected backends
        for backend in self._backends():
            self._watch(backend)

    def _backends(self) -> list[Backend]:
        """The pools' backends now (the fleet adds and removes discovered ones)."""
        return [backend for pool in self._pools.values() for backend in pool]

    def _watch(self, backend: Backend) -> _Watch:
        watch = self._watches.get(backend)
        if watch is None:  # first seen: it reports its failures in a row to this detector
            watch = self._watches[backend] = _Watch()
            if self.config.enabled:
                backend.failure_limit = self.config.consecutive_failures
                backend.on_outlier = self._on_failures
        return watch

    def __repr__(self) -> str:
        ejected = [b.address for b in self._backends() if b.ejected]
        return (f"<OutlierDetector ejected={ejected} ejections={self.ejections} refused={self.ejections_refused} "
                f"readmissions={self.readmissions} failed_over={self.requests_failed_over}>")

    def _on_failures(self, backend: Backend, reason: str) -> None:
        self.eject(backend, FAILURES, reason)

    def has_alternative(self, backend: Backend) -> bool:
        """Whether another backend is in rotation: failing over to nowhere turns a slow answer into
        an error, so a stalled backend with no alternative is left in place (a hung one fails its
        health checks and leaves rotation by them)."""
        return any(other.routable for other in self._backends() if other is not backend)

    def eject(self, backend: Backend, kind: str, reason: str) -> bool:
        """Take `backend` out of rotation and fail over what is pending on it; False if it already
        is out, or its pool's cap on ejected backends is reached."""
        if backend.ejected:
            return False
        pool = self._pools[backend.pool]
        allowed = max(1, len(pool) * self.config.max_ejected_percent // 100)
        if sum(1 for b in pool if b.ejected) >= allowed:
            self.ejections_refused += 1
            return False
        now = self._clock()
        watch = self._watch(backend)
        if watch.in_a_row and now - watch.readmitted_at >= self.config.max_ejection_s:
            watch.in_a_row = 0  # it stayed in rotation long enough: start again from the base
        length = min(self.config.base_ejection_s * 2 ** watch.in_a_row, self.config.max_ejection_s)
        watch.in_a_row += 1
        watch.until = now + length
        backend.ejected = True
        backend.consecutive_failures = 0
        self.ejections += 1
        self.ejections_by_reason[kind] = self.ejections_by_reason.get(kind, 0) + 1
        log.warning("backend %s (%s) ejected for %.1f s: %s", backend.address, backend.pool, length, reason)
        self._changed()  # the router stops choosing it before anything is failed over
        self.requests_failed_over += backend.abandon_pending(
            f"backend {backend.address} was taken out of rotation ({kind}) while the request waited on it")
        return True

    def sweep(self) -> None:
        """Eject stalled backends; readmit those whose ejection ended and that passed a health check since."""
        now = self._clock()
        stall_after = self.config.stall_after_s
        backends = self._backends()
        if len(self._watches) > len(backends):  # some left their pool (drained): forget them
            present = set(backends)
            self._watches = {b: w for b, w in self._watches.items() if b in present}
        for backend in backends:
            watch = self._watch(backend)
            if backend.ejected:
                if now >= watch.until and backend.checked_ok_at >= watch.until and backend.healthy:
                    backend.ejected = False
                    watch.readmitted_at = now
                    watch.answers = -1
                    self.readmissions += 1
                    log.info("backend %s (%s) readmitted after its ejection", backend.address, backend.pool)
                    self._changed()
                continue
            answers = backend.served + backend.failed
            if answers != watch.answers or not backend.outstanding:
                watch.answers = answers
                watch.since = now
            elif (now - watch.since >= stall_after and backend.failed_checks and backend.healthy
                  and self.config.enabled and self.has_alternative(backend)):
                self.eject(backend, STALL, f"{backend.outstanding} requests outstanding and no answer for "
                                           f"{now - watch.since:.2f} s")
                watch.answers = -1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.sweep()
            except Exception:  # a detector bug must never stop detection
                log.exception("outlier sweep failed unexpectedly")

    def snapshot(self) -> dict:
        return {"ejected": sorted(b.address for b in self._backends() if b.ejected), "ejections": self.ejections,
                "by_reason": dict(self.ejections_by_reason), "refused": self.ejections_refused,
                "readmissions": self.readmissions, "requests_failed_over": self.requests_failed_over}
