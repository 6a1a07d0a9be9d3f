"""A token bucket: a steady rate with bursts, and how long until the next token when it is empty."""

from __future__ import annotations

import math
import time


class TokenBucket:
    """`rate` tokens a second, up to `capacity`; starts full. `take()` spends one token or says
    how many milliseconds until one is there (the `grpc-retry-pushback-ms` a refusal carries)."""

    __slots__ = ("rate", "capacity", "tokens", "_stamp", "_clock", "taken", "refused")

    def __init__(self, rate: float, capacity: float, clock=time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._clock = clock
        self._stamp = clock()
        self.taken = 0
        self.refused = 0

    def __repr__(self) -> str:
        return (f"<TokenBucket {self.rate:g}/s capacity={self.capacity:g} tokens={self.tokens:.2f} "
                f"taken={self.taken} refused={self.refused}>")

    def take(self) -> int:
        """Spend a token: 0 when there was one, else the milliseconds (≥ 1) until there is."""
        now = self._clock()
        tokens = self.tokens + (now - self._stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self._stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.taken += 1
            return 0
        self.tokens = tokens
        self.refused += 1
        return max(1, math.ceil((1.0 - tokens) / self.rate * 1000.0))
