"""`Readiness`: whether the gateway takes new work, and how much it has in flight — what a drain
(SIGTERM) and the health answers read.

    serving ──drain()──▶ draining ──refuse()──▶ refusing
                         health NOT_SERVING,      new requests: UNAVAILABLE ("shutting down;
                         ServerReady false;       retry on another replica"); what is in
                         requests still served    flight finishes

The front door counts each inference request while it is in flight (`admitted` … `finished`), so
the drain knows when the work is done and when the last request came or went (`quiet_for`).
"""

from __future__ import annotations

import time
from typing import Callable

from gateway.errors import Unavailable

SHUTTING_DOWN = "the gateway is shutting down; retry the request on another replica"


class Readiness:
    def __init__(self) -> None:
        self.draining = False
        """True once a drain began: health says NOT_SERVING, ServerReady false."""
        self.refusing = False
        """True once new requests are refused with UNAVAILABLE."""
        self.in_flight = 0
        self._last_arrival = time.monotonic()
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "refusing" if self.refusing else "draining" if self.draining else "serving"
        return f"<Readiness {state} in_flight={self.in_flight}>"

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` when the gateway starts draining (health watchers)."""
        self._listeners.append(listener)

    def drain(self) -> None:
        """Stop being ready: load balancers and probes see NOT_SERVING; requests are still served."""
        if not self.draining:
            self.draining = True
            for listener in self._listeners:
                listener()

    def refuse(self) -> None:
        """Refuse new requests from now on (UNAVAILABLE, which clients retry elsewhere)."""
        self.drain()
        self.refusing = True

    def admitted(self) -> None:
        """A request arrives: refused while refusing, else counted in flight until `finished()`."""
        self._last_arrival = time.monotonic()  # refused ones too: a drain waits until they stop coming
        if self.refusing:
            raise Unavailable(SHUTTING_DOWN)
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        # An answer sent is a client's cue to send its next request: quiet counts from here too.
        self._last_arrival = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the last request arrived or was answered, 0 while any is in flight."""
        return 0.0 if self.in_flight else time.monotonic() - self._last_arrival
