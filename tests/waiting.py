"""Polling until something holds, for tests that wait on servers, threads and processes.

    backend = wait_until(lambda: gateway.snapshot()["backends"][address], "the backend to leave rotation",
                         timeout=10, accept=lambda state: state["health"] == "unhealthy")
    await wait_until_async(lambda: proxy.held == 1, "a request held at the proxy", step=0.005)

`predicate()` is called at once, then every `step` seconds, until its value is accepted (truthy, or
`accept(value)` when given); that value is returned. It is called at least once, and once more at
or past the deadline, so a wait never gives up before `timeout` seconds. On timeout an
AssertionError says what was awaited, the timeout and the last value (or the last ignored error,
chained); with `raise_on_timeout=False` the last value is returned instead (None after an error).

`ignore`: exception types `predicate` may raise while the thing awaited is not there yet (a server
still starting); anything else it raises ends the wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["process_running", "wait_until", "wait_until_async"]


class _Polls:
    """The checks of one wait; iterating yields between two checks (where the caller sleeps)."""

    def __init__(self, predicate: Callable[[], Any], what: str, timeout: float,
                 accept: Callable[[Any], Any], ignore: tuple[type[BaseException], ...], raise_on_timeout: bool):
        self.predicate, self.what, self.timeout = predicate, what, timeout
        self.accept, self.ignore, self.raise_on_timeout = accept, ignore, raise_on_timeout
        self.result: Any = None

    def __iter__(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                value, error = self.predicate(), None
            except self.ignore as raised:
                value, error = None, raised
            else:
                if asyncio.iscoroutine(value):
                    value.close()
                    raise TypeError(f"the predicate for {self.what} returned a coroutine: pass a plain function")
                if self.accept(value):
                    self.result = value
                    return
            if time.monotonic() >= deadline:
                self.result = self._timed_out(value, error)
                return
            yield

    def _timed_out(self, value: Any, error: BaseException | None) -> Any:
        if not self.raise_on_timeout:
            return value
        last = f"the last check raised {error!r}" if error is not None else f"the last value was {value!r}"
        raise AssertionError(f"timed out after {self.timeout:g} s waiting for {self.what}; {last}") from error


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0, step: float = 0.05, *,
               accept: Callable[[Any], Any] = bool, ignore: tuple[type[BaseException], ...] = (),
               raise_on_timeout: bool = True) -> Any:
    """`predicate()` every `step` s until `accept`ed (truthy by default): that value (see the module)."""
    polls = _Polls(predicate, what, timeout, accept, ignore, raise_on_timeout)
    for _ in polls:
        time.sleep(step)
    return polls.result


async def wait_until_async(predicate: Callable[[], Any], what: str, timeout: float = 30.0, step: float = 0.05, *,
                           accept: Callable[[Any], Any] = bool, ignore: tuple[type[BaseException], ...] = (),
                           raise_on_timeout: bool = True) -> Any:
    """wait_until on an event loop: asyncio.sleep between the checks. `predicate` is a plain function
    (not a coroutine) called on the loop, so it must be quick."""
    polls = _Polls(predicate, what, timeout, accept, ignore, raise_on_timeout)
    for _ in polls:
        await asyncio.sleep(step)
    return polls.result


def process_running(pid: int) -> bool:
    """True while process `pid` exists and has not ended (a zombie, ended but not yet reaped by its
    parent, counts as ended), read from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False
