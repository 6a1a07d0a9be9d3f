"""A model's shadow target: copies of its live requests go to another version and/or pool.

The copy is made once the live request is done (the pipeline observer), so the live request never
waits for it; it goes out through a bounded Mirror (gateway/routing/mirror.py): dropped and
counted when `max_in_flight` copies are out. The shadow's answers are discarded after their latency,
errors and output values are recorded here, next to the live version's outputs on the same bins.
"""

from __future__ import annotations

import random

from gateway.errors import GatewayError
from gateway.pipeline.exchange import Exchange
from gateway.routing.config import ShadowConfig
from gateway.routing.mirror import Mirror
from gateway.routing.router import Router
from gateway.traffic.stats import OutputComparison, TrafficCounters


class ShadowTarget:
    """The shadow of one model: where its copies go, and what came back."""

    def __init__(self, model: str, config: ShadowConfig, router: Router, rng: random.Random | None = None) -> None:
        self.model = model
        self.config = config
        self._router = router
        self._random = (rng or random.Random()).random
        self.mirror = Mirror(config.max_in_flight)
        self.counters = TrafficCounters()  # the shadow's answers: latency, errors by status
        self.outputs = OutputComparison(config.output, config.bins, config.learn_values)
        self.unplaced = 0  # copies with no healthy shadow backend to go to
        self.skipped = 0  # live requests not copied: sequences and decoupled models

    def __repr__(self) -> str:
        return f"<ShadowTarget {self.model} version={self.config.version or '(live)'} pool={self.config.pool or '(route)'} {self.mirror!r}>"

    def observe(self, exchange: Exchange, response, error) -> None:
        """A live request of the model finished: note its outputs, and send its copy."""
        if response is not None:
            self.outputs.add("live", response)
        config = self.config
        if config.fraction < 1.0 and self._random() >= config.fraction:
            return
        entry, request = exchange.entry, exchange.request
        if entry.signature.decoupled or "sequence_id" in request.parameters:
            self.skipped += 1
            return
        if not self.mirror.has_room():
            return  # the shadow is behind: this copy is dropped (counted), the live path moves on
        version = config.version or entry.version
        try:
            backend = self._router.choose_shadow(self.model, version, config.pool)
        except GatewayError:
            self.unplaced += 1
            return
        self.mirror.send(backend, request, config.timeout_ms / 1e3, self._answered, version=version)

    def _answered(self, backend, ahead: int, elapsed_s: float, response, error) -> None:
        self.counters.record(elapsed_s, error)
        if response is not None:
            self.outputs.add("shadow", response)

    def summary(self) -> dict:
        return {
            "version": self.config.version or None,
            "pool": self.config.pool or None,
            "fraction": self.config.fraction,
            **self.mirror.statistics(),
            "unplaced": self.unplaced,
            "skipped": self.skipped,
            **self.counters.summary(),
            "outputs": self.outputs.summary(),
        }
