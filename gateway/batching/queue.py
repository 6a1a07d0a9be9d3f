"""One batching queue: requests of one (model, version, batch key) waiting to be sent together.

A batch leaves the queue when
    full       its rows reach the model's max batch size (or the next request would overflow it);
    preferred  its rows reach a preferred batch size;
    delay      the oldest request has waited the delay cap: max_queue_delay_us in fixed mode; in
               adaptive mode the larger of that and twice the observed backend latency;
    deadline   a waiting request's deadline would pass before the delay ends;
    capacity   (adaptive) the model's backends have room for another batch in flight.

whatever the reason, no batch leaves while `inflight_limit()` batches are in flight (the backends
are saturated): requests then wait here, where `max_queue_size` bounds them, and the next batch
leaves when one comes back.

Invariants: every request's future is resolved exactly once — with its own response, with the
batch's error, with DEADLINE_EXCEEDED when its deadline passed while it waited (it is then never
sent), or it was cancelled by its caller and is skipped. A request never waits longer than the
delay cap because of batching.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable

from gateway.batching.config import BatchingPolicy
from gateway.batching.counters import BatchCounters
from gateway.errors import DeadlineExceeded, GatewayError, InternalError, ResourceExhausted

log = logging.getLogger(__name__)

FULL, PREFERRED, DELAY, DEADLINE, CAPACITY = "full", "preferred", "delay", "deadline", "capacity"

#: Least time before a waiting request's deadline at which its batch is sent.
MIN_DEADLINE_MARGIN_S = 0.002

#: Smoothing of the backend latency estimate (per batch).
LATENCY_EWMA_ALPHA = 0.2


class Queued:
    """A request waiting in a batch queue. `item` is what the caller queued (the batching dispatcher
    queues the request's Exchange). `waited_s` is set when its batch leaves: time in the queue.
    `own_send_by`: the latest moment the tenth-of-its-time margin lets it leave (BatchQueue._send_by)."""

    __slots__ = ("item", "rows", "future", "deadline", "enqueued", "waited_s", "own_send_by")

    def __init__(self, item, rows: int, future: asyncio.Future, deadline: float | None, enqueued: float) -> None:
        self.item = item
        self.rows = rows
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.waited_s = 0.0
        self.own_send_by = None if deadline is None else deadline - 0.1 * (deadline - enqueued)


SendBatch = Callable[[list[Queued]], Awaitable[None]]


class BatchQueue:
    """Requests of one batch key, by priority level; sends batches through `send`.

    `capacity()` says how many batches of this model may be in flight (adaptive mode).

    Waiting requests' deadlines are tracked as requests come and go, never scanned: per level, two
    monotonic deques (a sliding-window minimum) hold the requests with a deadline in arrival order,
    increasing by `deadline` and by `own_send_by`, so their heads are the level's minima. A request
    leaves its level only from the head (FIFO), so when it leaves it is at the head of a deque or
    in none of them.
    """

    def __init__(
        self,
        model: str,
        policy: BatchingPolicy,
        max_rows: int,
        send: SendBatch,
        capacity: Callable[[], int],
        counters: BatchCounters,
        clock: Callable[[], float] = time.monotonic,
        inflight_limit: Callable[[], int] | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.max_rows = max_rows
        self.preferred = frozenset(s for s in policy.preferred_batch_sizes if s <= max_rows)
        self.adaptive = policy.mode == "adaptive"
        self.max_delay_s = policy.max_queue_delay_us / 1e6
        self._send = send
        self._capacity = capacity
        self._inflight_limit = inflight_limit or (lambda: 1 << 62)
        self._clock = clock
        self.counters = counters
        self._levels: list[collections.deque[Queued]] = [collections.deque() for _ in range(policy.priority_levels)]
        self._by_deadline: list[collections.deque[Queued]] = [collections.deque() for _ in self._levels]
        self._by_own_send_by: list[collections.deque[Queued]] = [collections.deque() for _ in self._levels]
        self._level_of = [self._level(priority) for priority in range(policy.priority_levels + 1)]
        self.size = 0  # requests waiting
        self.rows = 0  # rows waiting
        self.inflight = 0  # batches sent, not yet answered
        self.backend_latency_s = 0.0  # EWMA of send → response, per batch
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer fires (monotonic)
        self._with_deadline = 0  # waiting requests that carry a deadline
        self._end_of_turn_pending = False
        self._saturated = False  # a due batch is held until one comes back (no scheduling meanwhile)
        self._idle_wake = 0.0  # set by _due when nothing is due: when something will be
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return (
            f"<BatchQueue {self.model} {self.policy.mode} waiting={self.size} rows={self.rows} "
            f"inflight={self.inflight} latency={self.backend_latency_s * 1e3:.2f}ms>"
        )

    # ---- admission -----------------------------------------------------------------------------

    def put(self, item, rows: int, deadline: float | None, priority: int) -> asyncio.Future:
        """Queue a validated request; the returned future resolves to its own response."""
        now = self._clock()
        if self.size >= self.policy.max_queue_size:
            self.counters.rejected_full += 1
            raise ResourceExhausted(
                f"model '{self.model}': batching queue is full ({self.policy.max_queue_size} requests waiting); "
                "retry later or raise batching max_queue_size",
                # about when the queue has room again: a batch coming back
                pushback_ms=max(1, int(2e3 * self.backend_latency_s)),
            )
        if deadline is not None and deadline - now < self.backend_latency_s:
            self.counters.rejected_deadline += 1
            raise DeadlineExceeded(
                f"model '{self.model}': the request's deadline ({(deadline - now) * 1e3:.2f} ms left) cannot be "
                f"met: its backend answers in ~{self.backend_latency_s * 1e3:.2f} ms; the request was not sent"
            )
        future = asyncio.get_running_loop().create_future()
        level = self._level_of[priority] if 0 <= priority < len(self._level_of) else self._level(priority)
        pending = Queued(item, rows, future, deadline, now)
        self._levels[level].append(pending)
        self.size += 1
        self.rows += rows
        if deadline is not None:
            self._with_deadline += 1
            by_deadline = self._by_deadline[level]
            while by_deadline and by_deadline[-1].deadline >= deadline:
                by_deadline.pop()
            by_deadline.append(pending)
            by_own, own_send_by = self._by_own_send_by[level], pending.own_send_by
            while by_own and by_own[-1].own_send_by >= own_send_by:
                by_own.pop()
            by_own.append(pending)
        if not self._saturated:  # saturated: the next batch to come back schedules
            self._schedule(now)
        return future

    def _level(self, priority: int) -> int:
        levels = len(self._levels)
        effective = priority or self.policy.default_priority or levels
        return min(max(effective, 1), levels) - 1

    # ---- when to send --------------------------------------------------------------------------

    def _schedule(self, now: float, end_of_turn: bool = False) -> None:
        """Send every batch that is due now; arm the timer for the next one that will be.

        A batch due for spare capacity leaves at the end of the event loop's current turn, not at
        once: every request the loop admits in the same turn (under load, grpc hands over many
        calls per turn) joins it, at the cost of no added wait.
        """
        wake = None
        while self.size:
            reason = self._due(now)
            if reason is None:
                wake = self._idle_wake  # what _due found, not computed twice
                break
            if reason == CAPACITY and not end_of_turn:
                if not self._end_of_turn_pending:
                    self._end_of_turn_pending = True
                    asyncio.get_running_loop().call_soon(self._end_of_turn)
                break
            if reason != CAPACITY and self.inflight >= self._inflight_limit():
                # Saturated: the next batch to come back reschedules (_run); no timer, which
                # would only find the same batches due and nowhere to send them.
                self.counters.held_saturated += 1
                self._saturated = True
                return
            self._dispatch(reason, now)
        self._arm_timer(now, wake)

    def _end_of_turn(self) -> None:
        self._end_of_turn_pending = False
        self._schedule(self._clock(), end_of_turn=True)

    def _due(self, now: float) -> str | None:
        """Why a batch must leave now, or None; with None, `_idle_wake` is when one will have to."""
        if self.rows >= self.max_rows:
            return FULL
        if self.rows in self.preferred:
            return PREFERRED
        if self.adaptive and self.inflight < self._capacity():
            return CAPACITY
        oldest, delay_cap = self._oldest(), self._delay_cap()
        if now - oldest >= delay_cap:
            return DELAY
        send_by = self._send_by()
        if send_by is not None and now >= send_by:
            return DEADLINE
        self._idle_wake = oldest + delay_cap if send_by is None else min(oldest + delay_cap, send_by)
        return None

    def _oldest(self) -> float:
        levels = self._levels
        if len(levels) == 1:
            return levels[0][0].enqueued
        return min(level[0].enqueued for level in levels if level)

    def _delay_cap(self) -> float:
        """Longest a request waits for batch-mates.

        Fixed mode: max_queue_delay_us. Adaptive mode: while the backends are busy, requests wait
        for a batch in flight to come back — about one backend latency — so the cap follows the
        observed latency and max_queue_delay_us is only its floor.
        """
        if self.adaptive:
            return max(self.max_delay_s, 2 * self.backend_latency_s)
        return self.max_delay_s

    def _send_by(self) -> float | None:
        """The latest moment the waiting requests' deadlines allow their batch to leave.

        A request must leave while its deadline still leaves the backend time to answer: twice
        the observed backend latency, a tenth of the time the request had when it arrived (the
        estimate may lag a busy backend), and never less than MIN_DEADLINE_MARGIN_S.

        min over requests of (deadline - max(latency margin, tenth)) is min(earliest deadline -
        latency margin, earliest own_send_by): the two deques' heads, the same floats exactly.
        """
        if not self._with_deadline:
            return None
        latency_margin = max(2 * self.backend_latency_s, MIN_DEADLINE_MARGIN_S)
        send_by = None
        for by_deadline, by_own in zip(self._by_deadline, self._by_own_send_by):
            if by_deadline:
                candidate = min(by_deadline[0].deadline - latency_margin, by_own[0].own_send_by)
                if send_by is None or candidate < send_by:
                    send_by = candidate
        return send_by

    def _arm_timer(self, now: float, wake: float | None = None) -> None:
        """Make sure a timer fires by the next moment a batch may become due (`wake`, when the
        caller knows it).

        An armed timer that fires no later than needed is kept (re-arming on every request would
        cost a timer handle per request); one that fires early finds nothing due and re-arms.
        """
        if not self.size:
            return
        if wake is None:
            wake = self._oldest() + self._delay_cap()
            send_by = self._send_by()
            if send_by is not None:
                wake = min(wake, send_by)
        if self._timer is not None:
            if self._timer_at <= wake:
                return
            self._timer.cancel()
        self._timer_at = wake
        self._timer = asyncio.get_running_loop().call_later(max(wake - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule(self._clock())

    # ---- sending -------------------------------------------------------------------------------

    def _take(self, now: float) -> list[Queued]:
        """Up to max_rows rows of live requests, highest priority first, FIFO within a level."""
        batch: list[Queued] = []
        rows = 0
        max_rows = self.max_rows
        for index, level in enumerate(self._levels):
            while level:
                head = level[0]
                if head.future.done():  # its caller went away
                    self._pop(index)
                    continue
                deadline = head.deadline
                if deadline is not None and deadline <= now:
                    self._pop(index)
                    self.counters.expired += 1
                    head.future.set_exception(
                        DeadlineExceeded(f"model '{self.model}': deadline passed while waiting for a batch; not sent")
                    )
                    continue
                if rows + head.rows > max_rows:
                    return batch
                if deadline is None:  # _pop, inline: the common case, once per request
                    level.popleft()
                    self.size -= 1
                    self.rows -= head.rows
                else:
                    self._pop(index)
                batch.append(head)
                rows += head.rows
        return batch

    def _pop(self, index: int) -> Queued:
        pending = self._levels[index].popleft()
        self.size -= 1
        self.rows -= pending.rows
        if pending.deadline is not None:
            self._with_deadline -= 1
            by_deadline, by_own = self._by_deadline[index], self._by_own_send_by[index]
            if by_deadline and by_deadline[0] is pending:
                by_deadline.popleft()
            if by_own and by_own[0] is pending:
                by_own.popleft()
        return pending

    def _dispatch(self, reason: str, now: float) -> None:
        batch = self._take(now)
        if not batch:
            return
        self.inflight += 1
        for pending in batch:
            pending.waited_s = now - pending.enqueued
        self.counters.record_batch(reason, sum(p.rows for p in batch), [p.waited_s for p in batch])
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Queued]) -> None:
        started = self._clock()
        try:
            await self._send(batch)
        except GatewayError as error:
            self._fail(batch, error)
        except Exception as error:  # a gateway bug must not leave requests waiting forever
            log.exception("model '%s': batch failed unexpectedly", self.model)
            self._fail(batch, InternalError(f"internal gateway error while batching: {error!r}"))
        finally:
            elapsed = self._clock() - started
            self.backend_latency_s += LATENCY_EWMA_ALPHA * (elapsed - self.backend_latency_s)
            self.inflight -= 1
            self._saturated = False
            if self.size:
                self._schedule(self._clock(), end_of_turn=True)

    @staticmethod
    def _fail(batch: list[Queued], error: GatewayError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    @property
    def idle(self) -> bool:
        """Nothing waits and no batch of it is in flight: it may be dropped (and made again)."""
        return self.size == 0 and not self._tasks

    def retire(self) -> None:
        """Drop an idle queue: its timer, if one is armed, will not fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
