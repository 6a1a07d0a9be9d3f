"""TrafficStage: the versions' traffic of every model — splits, shadows, per-version counters.

The programmatic API a rollout drives (each takes effect on the next request):

    set_split(model, {version: weight})   replace the model's split (weights >= 0, one positive)
    clear_split(model)                    requests naming no version go to the default version again
    set_shadow(model, ShadowConfig)       copy live traffic to a version and/or pool
    clear_shadow(model)
    version_counters(model)               {version: TrafficCounters} of live traffic
    outputs[model]                        a split's OutputComparison: each version's outputs vs the stable one's
    shadow_of(model)                      the ShadowTarget (its counters, drops, output comparison)
    snapshot()                            all of it as JSON-able dicts (admin GetSnapshot `traffic`)

Plugged in by app.py: `pipeline.version_pickers` (the splits, by model), the pipeline observer
(per-version counters and shadow copies, for models with a split or a shadow only).
"""

from __future__ import annotations

import asyncio
import logging
import random

from gateway.errors import ConfigError, GatewayError
from gateway.pipeline.exchange import Exchange
from gateway.routing.config import STICKY_KEY, ModelRoute, ShadowConfig
from gateway.routing.router import Router
from gateway.traffic.shadow import ShadowTarget
from gateway.traffic.split import VersionSplit
from gateway.traffic.stats import WARM, OutputComparison, TrafficCounters, warm_up

#: Bins and learned values of the per-version output comparison of a split (as a shadow's defaults).
SPLIT_BINS, SPLIT_LEARN_VALUES = ShadowConfig.bins, ShadowConfig.learn_values

log = logging.getLogger(__name__)


class TrafficStage:
    def __init__(self, router: Router, routes: dict[str, ModelRoute] | None, rng: random.Random | None = None) -> None:
        self._router = router
        self._rng = rng or random.Random()
        self.pickers: dict[str, object] = {}
        """model -> its split's `pick(request, call)`: the dict the pipeline reads (same object)."""
        self.splits: dict[str, VersionSplit] = {}
        self.shadows: dict[str, ShadowTarget] = {}
        self.counters: dict[tuple[str, str], TrafficCounters] = {}
        self.outputs: dict[str, OutputComparison] = {}
        """model with a split -> its versions' outputs, compared with the stable version's."""
        self._warming: asyncio.Future | None = None
        for model, route in (routes or {}).items():
            if route.split is not None:
                self.set_split(model, route.split)
            if route.shadow is not None:
                self.set_shadow(model, route.shadow)

    def __repr__(self) -> str:
        return f"<TrafficStage splits={sorted(self.splits)} shadows={sorted(self.shadows)}>"

    def _sticky_key(self, model: str) -> str:
        route = self._router.route_of(model)
        return route.sticky_key if route is not None else STICKY_KEY

    def routes(self, model: str) -> bool:
        return self._router.routes(model)

    # ---- the rollout API ----------------------------------------------------------------------

    def check_split(self, model: str, weights: dict[str, float]) -> None:
        """Raise ConfigError when `weights` is not a valid split (changes nothing)."""
        VersionSplit(model, {str(v): float(w) for v, w in weights.items()}, self._sticky_key(model))

    def check_shadow(self, model: str, config: ShadowConfig) -> None:
        """Raise ConfigError when `config` is not a valid shadow of the model (changes nothing)."""
        config.validate(f"models.{model}.shadow")
        if config.pool and config.pool not in self._router.pool_names():
            raise ConfigError(
                f"models.{model}.shadow.pool",
                f"unknown pool {config.pool!r}; expected one of: {', '.join(self._router.pool_names())}",
            )

    def set_split(self, model: str, weights: dict[str, float]) -> VersionSplit:
        """Split the model's requests that name no version between versions by weight. Raises
        ConfigError (naming what is wrong) for weights that are not a split."""
        split = VersionSplit(model, {str(v): float(w) for v, w in weights.items()}, self._sticky_key(model), self._rng)
        if model in self.splits:  # counts carry over for the versions that stay
            for version, count in self.splits[model].picked.items():
                if version in split.picked:
                    split.picked[version] += count
        self.splits[model] = split
        comparison = self.outputs.get(model)
        if comparison is None or comparison.reference != split.stable:  # compared with the stable version
            route = self._router.route_of(model)
            output = route.compare_output if route is not None else ""
            self.outputs[model] = OutputComparison(output, SPLIT_BINS, SPLIT_LEARN_VALUES, reference=split.stable)
            self._warm()
        self.pickers[model] = split.pick
        self._router.set_canaries(model, split.canaries)
        log.info("traffic split of %s: %s (stable %s)", model, split.weights, split.stable)
        return split

    def clear_split(self, model: str) -> None:
        self.splits.pop(model, None)
        self.pickers.pop(model, None)
        self.outputs.pop(model, None)
        self._router.set_canaries(model, set())

    def set_shadow(self, model: str, config: ShadowConfig) -> ShadowTarget:
        """Copy the model's live traffic to `config`'s version and/or pool (replacing any shadow)."""
        self.check_shadow(model, config)
        previous = self.shadows.get(model)
        target = self.shadows[model] = ShadowTarget(model, config, self._router, self._rng)
        if previous is not None:
            asyncio.ensure_future(previous.mirror.close())
        self._warm()
        log.info("shadow of %s: %r", model, target)
        return target

    def clear_shadow(self, model: str) -> None:
        target = self.shadows.pop(model, None)
        if target is not None:
            asyncio.ensure_future(target.mirror.close())

    def shadow_of(self, model: str) -> ShadowTarget | None:
        return self.shadows.get(model)

    def version_counters(self, model: str) -> dict[str, TrafficCounters]:
        return {version: counters for (name, version), counters in self.counters.items() if name == model}

    # ---- the pipeline side --------------------------------------------------------------------

    def observer(self, exchange: Exchange, response, error: GatewayError | None) -> None:
        """Per-version counters and the shadow copy of a finished live request (models with a split or
        a shadow only: others cost two dict lookups)."""
        model = exchange.entry.name
        shadow = self.shadows.get(model)
        if shadow is None and model not in self.splits:
            return
        version = exchange.entry.version
        key = (model, version)
        counters = self.counters.get(key)
        if counters is None:
            counters = self.counters[key] = TrafficCounters()
        counters.record(exchange.elapsed_ns / 1e9, error)
        comparison = self.outputs.get(model)
        if comparison is not None and response is not None:
            comparison.add(version, response)
        if shadow is not None:
            shadow.observe(exchange, response, error)

    def _warm(self) -> None:
        """Compile the comparison's kernels in a thread (the twins count meanwhile)."""
        if WARM[0] or self._warming is not None:
            return
        try:
            self._warming = asyncio.ensure_future(asyncio.to_thread(warm_up))
        except RuntimeError:  # no running loop (built outside it): start() warms instead
            self._warming = None

    async def start(self) -> None:
        if self.shadows:
            self._warm()

    async def close(self) -> None:
        for target in list(self.shadows.values()):
            await target.mirror.close()
        if self._warming is not None and not self._warming.done():
            await asyncio.gather(self._warming, return_exceptions=True)

    def shadow_copies(self) -> dict[tuple[str, str], int]:
        """{(model, outcome): copies} for the metrics (outcome: sent, dropped, failed, unplaced)."""
        counts = {}
        for model, target in list(self.shadows.items()):
            mirror = target.mirror
            for outcome, count in (("sent", mirror.sent), ("dropped", mirror.dropped), ("failed", mirror.failed),
                                   ("unplaced", target.unplaced)):
                counts[(model, outcome)] = count
        return counts

    def snapshot(self) -> dict:
        models = sorted({*self.splits, *self.shadows, *(name for name, _ in self.counters)})
        result = {}
        for model in models:
            split = self.splits.get(model)
            shadow = self.shadows.get(model)
            result[model] = {
                "split": None if split is None else {
                    "weights": split.weights, "stable": split.stable, "canaries": sorted(split.canaries),
                    "sticky_key": split.sticky_key, "picked": dict(split.picked),
                },
                "versions": {version: c.summary() for version, c in sorted(self.version_counters(model).items())},
                "outputs": None if model not in self.outputs else self.outputs[model].summary(),
                "shadow": None if shadow is None else shadow.summary(),
            }
        return result
