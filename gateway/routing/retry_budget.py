"""Retry budget: retries may add at most `ratio` of the requests sent, plus `min_per_s` (cf. linkerd).

Every first attempt deposits (one integer addition on the hot path); a retry withdraws one token.
Tokens accrue `ratio` per request and `min_per_s` per second (so a quiet service may still retry
a few), and are capped at what `window_s` seconds of that accrual give, with requests counted over
a decaying window, so a long quiet spell cannot save up a retry storm. Over any stretch of time,
retries ≤ ratio × requests + min_per_s × seconds + the cap.
"""

from __future__ import annotations

import math
import time
from typing import Callable


class RetryBudget:
    __slots__ = ("ratio", "min_per_s", "window_s", "requests", "tokens", "_recent", "_at", "_clock",
                 "spent", "refused")

    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        self.requests = 0  # first attempts since the last withdrawal (the hot path adds to it)
        self._recent = 0.0  # requests over the decaying window
        self.tokens = min_per_s  # a fresh gateway may retry a few at once
        self._at = clock()
        self.spent = 0  # retries the budget allowed
        self.refused = 0  # retries it refused

    def __repr__(self) -> str:
        return (f"<RetryBudget ratio={self.ratio} min_per_s={self.min_per_s} tokens={self.tokens:.1f} "
                f"spent={self.spent} refused={self.refused}>")

    def _refill(self) -> None:
        now = self._clock()
        elapsed, self._at = max(now - self._at, 0.0), now
        fresh, self.requests = self.requests, 0
        self._recent = self._recent * math.exp(-elapsed / self.window_s) + fresh
        cap = self.min_per_s * self.window_s + self.ratio * self._recent
        self.tokens = min(cap, self.tokens + self.ratio * fresh + self.min_per_s * elapsed)

    def withdraw(self) -> bool:
        """Take one retry from the budget; False (counted as refused) when it is spent."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False
