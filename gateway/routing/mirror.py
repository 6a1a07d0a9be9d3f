"""Fire-and-forget copies of requests (shadow traffic, probes): bounded, never in a live request's way.

A copy is sent as its own task with its own deadline; its answer goes to a callback and nowhere
else. At most `max_in_flight` copies are out at once: a copy beyond that is dropped and counted,
never queued, so a slow or failing target costs the live path one counter bump. Nothing a copy does
(an error, a hang, a cancellation at shutdown) reaches the request it was copied from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from gateway.errors import GatewayError
from gateway.upstream.backend import Backend

log = logging.getLogger(__name__)

#: on_done(backend, ahead, elapsed_s, response or None, error or None)
OnDone = Callable[[Backend, int, float, object, "BaseException | None"], None]


class Mirror:
    """Sends copies of requests to backends, at most `max_in_flight` at a time."""

    def __init__(self, max_in_flight: int, clock=time.perf_counter) -> None:
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._pending: set[asyncio.Future] = set()
        self.sent = 0
        self.dropped = 0  # copies not sent because max_in_flight were out
        self.failed = 0  # copies whose backend answered with an error (or that could not be sent)

    def __repr__(self) -> str:
        return f"<Mirror in_flight={len(self._pending)}/{self.max_in_flight} sent={self.sent} dropped={self.dropped} failed={self.failed}>"

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def statistics(self) -> dict:
        return {"in_flight": len(self._pending), "sent": self.sent, "dropped": self.dropped, "failed": self.failed}

    def has_room(self) -> bool:
        """Whether a copy may go out now; when not, the copy counts as dropped (ask just before
        placing it, so a copy that will be dropped costs no placement)."""
        if len(self._pending) < self.max_in_flight:
            return True
        self.dropped += 1
        return False

    def send(self, backend: Backend, request, timeout_s: float, on_done: OnDone, version: str | None = None) -> bool:
        """Send a copy of `request` (with `version` as its model version when given) to `backend`;
        False when it was dropped. Never raises."""
        if len(self._pending) >= self.max_in_flight:
            self.dropped += 1
            return False
        copy = type(request)()
        copy.CopyFrom(request)
        if version is not None:
            copy.model_version = version
        copy.parameters["timeout"].int64_param = max(int(timeout_s * 1e6), 1)
        ahead = backend.outstanding
        started = self._clock()
        try:
            future = asyncio.ensure_future(backend.infer(copy))
        except Exception as error:  # noqa: BLE001 — a copy never fails its caller
            self.failed += 1
            log.debug("copy to %s not sent: %r", backend.address, error)
            return False
        self.sent += 1
        self._pending.add(future)
        future.add_done_callback(lambda done: self._finished(done, backend, ahead, started, on_done))
        return True

    def _finished(self, future: asyncio.Future, backend: Backend, ahead: int, started: float, on_done: OnDone) -> None:
        self._pending.discard(future)
        elapsed = self._clock() - started
        response = error = None
        if future.cancelled():
            error = asyncio.CancelledError()
        else:
            error = future.exception()
            if error is None:
                response = future.result()
        if error is not None:
            self.failed += 1
            if not isinstance(error, (GatewayError, asyncio.CancelledError)):
                log.warning("copy to %s failed unexpectedly: %r", backend.address, error)
        try:
            on_done(backend, ahead, elapsed, response, error)
        except Exception:  # noqa: BLE001 — a recorder's bug must not escape into the event loop
            log.exception("recording a copy's answer failed")

    async def close(self) -> None:
        """Cancel the copies still out (at shutdown) and wait for them to finish."""
        pending = list(self._pending)
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
