"""A model's traffic split between versions: weighted, sticky on a client's key.

A request that names no version gets one drawn by the weights; a request carrying the sticky key
(gRPC metadata or a request parameter, `tensorgate-sticky-key` by default) gets the version a
stable hash of the key falls on, so one key always lands on one version while the split stays.
Versions take their shares of [0, 1) newest first: raising a newer version's weight (a canary
going 5 → 25 → 50 → 100 %) only ever moves keys onto it, never between older versions.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right

from gateway.protocol import parameter_value
from gateway.routing.config import validate_split


def key_fraction(key: str | bytes) -> float:
    """A stable position in [0, 1) for a sticky key (the same in every process and replica)."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64


class VersionSplit:
    """{version: weight} of one model; `pick(request, call)` sets the request's version."""

    __slots__ = ("model", "weights", "sticky_key", "_header", "stable", "canaries", "_versions", "_bounds", "_random", "picked")

    def __init__(self, model: str, weights: dict[str, float], sticky_key: str, rng: random.Random | None = None) -> None:
        validate_split(weights, f"models.{model}.split")
        self.model = model
        self.weights = dict(weights)
        self.sticky_key = sticky_key
        self._header = sticky_key.lower()  # gRPC metadata keys arrive lower-cased
        total = sum(weights.values())
        # Largest weight is the stable version (ties: the older one); every other version with a
        # positive weight gets canary traffic.
        self.stable = max(sorted(weights, key=int), key=lambda v: weights[v])
        self.canaries = {v for v, w in weights.items() if w > 0 and v != self.stable}
        self._versions = [v for v in sorted(weights, key=int, reverse=True) if weights[v] > 0]
        bounds, running = [], 0.0
        for version in self._versions:
            running += weights[version] / total
            bounds.append(running)
        bounds[-1] = 1.0  # rounding never leaves a gap at the top
        self._bounds = bounds
        self._random = (rng or random.Random()).random
        self.picked: dict[str, int] = dict.fromkeys(weights, 0)  # requests given each version

    def __repr__(self) -> str:
        return f"<VersionSplit {self.model} {self.weights} stable={self.stable} picked={self.picked}>"

    def version_at(self, fraction: float) -> str:
        return self._versions[min(bisect_right(self._bounds, fraction), len(self._versions) - 1)]

    def sticky_value(self, request, call) -> str | None:
        """The request's sticky key: its parameter (removed: Triton need not see it, and it would keep
        the request from batching with others) or else the call's metadata (`call.header`)."""
        parameters = request.parameters
        key = self.sticky_key
        if key in parameters:
            value = parameters[key]
            held = parameter_value(value)
            found = None if held is None else str(held)
            del parameters[key]
            if found:
                return found
        if call is not None:
            value = call.header(self._header)
            if value is not None:
                return value if isinstance(value, str) else value.decode("utf-8", "replace")
        return None

    def pick(self, request, call) -> None:
        """Give a request that names no version its version (a request that names one keeps it).
        `call`: the call's headers (gateway/pipeline/contracts.py's CallHeaders), or None."""
        sticky = self.sticky_value(request, call)
        if request.model_version:
            return
        version = self.version_at(key_fraction(sticky) if sticky is not None else self._random())
        request.model_version = version
        self.picked[version] += 1
