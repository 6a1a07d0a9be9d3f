"""Deadlines and vanished clients of the calls in flight, watched by one timer per event loop.

An ASGI engine learns of neither by itself: a deadline is a time the engine must act on, and under
pyvoy a unary call's client that resets its stream is seen only by asking (`receive()` answers
`http.disconnect` once the stream is gone, and an empty body at once while it is not). One timer per
call would cost ~2.5 µs (uvloop `call_later` + `cancel`); here a call costs a few set and dict
operations, and the one timer wakes only when something is due:

- deadlines sit in buckets of `tick_s` (a heap of bucket keys says which is next); due buckets'
  calls are cancelled with `ended_by = "deadline"`, half a tick to two ticks late;
- calls whose client is polled sit in a dict in the order they were last checked; those not checked
  for `poll_s` get one `receive()`, and an `http.disconnect` cancels them
  (`ended_by = "disconnect"`). Calls shorter than `poll_s` are never polled.

Invariant: a Watched is in `_polled` and in at most one bucket until `discard`, which the engine
calls once, in a `finally`; the timer is set whenever anything is watched, for no later than the
first thing due.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time

__all__ = ["CallWatch", "Watched"]

DEADLINE = "deadline"
DISCONNECT = "disconnect"


class Watched:
    """One watched call: the task to cancel, and why it was cancelled (None while it was not)."""

    __slots__ = ("task", "receive", "checked", "bucket", "ended_by")

    def __init__(self, task: asyncio.Task, receive, now: float) -> None:
        self.task = task
        self.receive = receive
        self.checked = now
        self.bucket: int | None = None
        self.ended_by: str | None = None

    def __repr__(self) -> str:
        return f"<Watched {self.task.get_name()} bucket={self.bucket} ended_by={self.ended_by}>"


class CallWatch:
    """The watch of one event loop's calls (create and use it on that loop)."""

    def __init__(self, tick_s: float = 0.005, poll_s: float | None = 0.5) -> None:
        self.tick_s = tick_s
        self.poll_s = poll_s
        self._buckets: dict[int, set[Watched]] = {}
        self._keys: list[int] = []  # heap of bucket keys; keys of emptied buckets linger until popped
        self._polled: dict[Watched, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._wake_at = math.inf  # monotonic time the timer fires at
        self.expired = 0
        self.disconnected = 0
        self.wakes = 0

    def __repr__(self) -> str:
        deadlines = sum(len(calls) for calls in self._buckets.values())
        return (f"<CallWatch deadlines={deadlines} polled={len(self._polled)} expired={self.expired} "
                f"disconnected={self.disconnected} wakes={self.wakes}>")

    def add(self, task: asyncio.Task, deadline: float | None, receive=None) -> Watched:
        """Watch `task`: cancel it at `deadline` (monotonic), and, with `receive`, when its client goes."""
        now = time.monotonic()
        watched = Watched(task, receive, now)
        if deadline is not None:
            bucket = int(deadline / self.tick_s) + 2  # its time is over a tick past the deadline
            calls = self._buckets.get(bucket)
            if calls is None:
                self._buckets[bucket] = {watched}
                heapq.heappush(self._keys, bucket)
            else:
                calls.add(watched)
            watched.bucket = bucket
            due = bucket * self.tick_s
            if due < self._wake_at:
                self._wake(due, now)
        if receive is not None and self.poll_s is not None:
            self._polled[watched] = None
            if now + self.poll_s < self._wake_at:
                self._wake(now + self.poll_s, now)
        return watched

    def discard(self, watched: Watched) -> None:
        """The call ended: stop watching it."""
        if watched.bucket is not None:
            calls = self._buckets.get(watched.bucket)
            if calls is not None:
                calls.discard(watched)
                if not calls:
                    del self._buckets[watched.bucket]
            watched.bucket = None
        self._polled.pop(watched, None)

    def _wake(self, when: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, when - now), self._fire)
        self._wake_at = when

    def _fire(self) -> None:
        self._timer, self._wake_at = None, math.inf
        self.wakes += 1
        now = time.monotonic()
        self._expire(int(now / self.tick_s + 0.5))  # timers fire up to a millisecond early
        if self._polled:
            self._poll(now)
        upcoming = []
        keys = self._keys
        while keys and keys[0] not in self._buckets:
            heapq.heappop(keys)  # emptied buckets
        if keys:
            upcoming.append(keys[0] * self.tick_s)
        if self._polled:
            upcoming.append(next(iter(self._polled)).checked + self.poll_s)
        if upcoming:
            self._wake(min(upcoming), now)

    def _expire(self, due: int) -> None:
        keys = self._keys
        while keys and keys[0] <= due:
            calls = self._buckets.pop(heapq.heappop(keys), None)
            if calls:
                for watched in calls:
                    watched.bucket = None
                    self._end(watched, DEADLINE)

    def _poll(self, now: float) -> None:
        stale = now - self.poll_s + 0.002  # timers fire up to a millisecond early
        polled = self._polled
        while polled:
            watched = next(iter(polled))
            if watched.checked > stale:
                break
            del polled[watched]
            watched.checked = now
            polled[watched] = None  # to the back: checked most recently
            try:
                answer = asyncio.ensure_future(watched.receive())
            except Exception:  # the server refused the receive: nothing to learn from it
                continue
            answer.add_done_callback(lambda done, watched=watched: self._answered(watched, done))

    def _answered(self, watched: Watched, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None or watched not in self._polled:
            return
        if done.result().get("type") == "http.disconnect":
            self._end(watched, DISCONNECT)

    def _end(self, watched: Watched, reason: str) -> None:
        if watched.ended_by is not None or watched.task.done():
            return
        self._polled.pop(watched, None)
        watched.ended_by = reason
        if reason == DEADLINE:
            self.expired += 1
        else:
            self.disconnected += 1
        watched.task.cancel()
