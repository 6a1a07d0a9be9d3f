"""Model (and version) → its pools, cheapest first → a backend, by power of two choices on a load score.

Without a latency objective a request goes to the first pool (cheapest, then the route's order)
that has a healthy backend. With one (`latency_slo_ms`), to the first pool predicted to meet it:
each backend's latency for the next request is predicted from what the router observed
(gateway/routing/placement.py: EWMA service time × queue ahead), a pool whose service time misses
the objective is closed until it recovers (hysteresis) and measured meanwhile by copies of live
requests (probes), and a request whose prediction misses on an open pool spills to the next.
When no pool is predicted to meet it, the request goes where it is predicted fastest.

The candidate tables are derived from the fleet and rebuilt only when the fleet's health or model
sets change (its `generation`) or a split names new canaries, so a routing decision on the hot path
is a dict lookup, two random picks and a few float operations per pool tried.
"""

from __future__ import annotations

import random
import time

from gateway.errors import NotFound, Unavailable, shown
from gateway.routing.config import ModelRoute, RoutingConfig
from gateway.routing.placement import LatencyEstimate, PoolGate, load_score
from gateway.routing.rendezvous import Rendezvous, sequence_key
from gateway.upstream.backend import Backend
from gateway.upstream.fleet import Fleet

#: Why a backend was picked: the model's first (cheapest) pool had one predicted to meet the
#: objective; an earlier pool had none healthy or would miss the objective; the backend first
#: picked was unavailable and this is the retry; a sequence is bound to it; the request is a
#: canary (a split sent it to a version other than the stable one) placed on its first pool; the
#: request is a shadow copy; the request is a probe copy measuring a pool that missed the objective.
PREFERRED, SPILL, FAILOVER, STICKY = "preferred", "spill", "failover", "sticky"
CANARY, SHADOW, PROBE = "canary", "shadow", "probe"
REASONS = (PREFERRED, SPILL, FAILOVER, CANARY, SHADOW, PROBE)


class PoolRow:
    """One pool of a model version's table: its healthy backends, their estimates, its SLO gate."""

    __slots__ = ("pool", "backends", "estimates", "gate")

    def __init__(self, pool: str, backends: list[Backend], estimates: list[LatencyEstimate], gate: PoolGate | None) -> None:
        self.pool = pool
        self.backends = backends
        self.estimates = estimates
        self.gate = gate


class Router:
    def __init__(
        self,
        fleet: Fleet,
        routes: dict[str, ModelRoute] | None,
        rng: random.Random | None = None,
        config: RoutingConfig | None = None,
        pool_costs: dict[str, float] | None = None,
        clock=time.monotonic,
    ) -> None:
        self._fleet = fleet
        self._routes = routes
        self._config = config or RoutingConfig()
        self._clock = clock
        costs = pool_costs or {}
        self._cost = lambda pool: costs.get(pool, 1.0)
        self._default_pools = self._by_cost(tuple(fleet.pools))
        self._random = (rng or random.Random()).random
        self._tables: dict[tuple[str, str], list[PoolRow]] = {}
        self._healthy_counts: dict[tuple[str, str], int] = {}
        self._estimates: dict[tuple[str, str, Backend], LatencyEstimate] = {}  # kept across table rebuilds
        self._gates: dict[tuple[str, str, str], PoolGate] = {}  # (model, version, pool): kept too
        self._canaries: set[tuple[str, str]] = set()  # (model, version) a split sends canary traffic to
        self.probe: Backend | None = None
        """Set by `choose` when a closed pool is due a probe: the dispatcher sends a copy of the
        request it is placing there (and clears it) before the next await."""
        fleet.on_change(self._fleet_changed)
        self.decisions: dict[tuple[str, str], int] = {}  # (pool, reason) -> backends picked
        self._rendezvous = Rendezvous()

    def __repr__(self) -> str:
        return f"<Router routes={'all' if self._routes is None else sorted(self._routes)} decisions={self.decisions}>"

    def _by_cost(self, pools: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(pools, key=self._cost))  # stable: equal costs keep the route's order

    def pools_of(self, model: str) -> tuple[str, ...] | None:
        """The model's pools in the order they are tried (cheapest first); None if the config does not route it."""
        if self._routes is None:
            return self._default_pools
        route = self._routes.get(model)
        return self._by_cost(route.pools) if route is not None else None

    def pool_names(self) -> tuple[str, ...]:
        return tuple(self._fleet.pools)

    def routes(self, model: str) -> bool:
        return (self._routes is None) or (model in self._routes)

    def route_of(self, model: str) -> ModelRoute | None:
        return self._routes.get(model) if self._routes is not None else None

    def sequence_idle_timeout_s(self, model: str) -> float | None:
        """The configured idle timeout of the model's sequences, or None to take the model's own."""
        route = self._routes.get(model) if self._routes is not None else None
        return route.sequence_idle_timeout_s if route is not None else None

    def set_canaries(self, model: str, versions: set[str]) -> None:
        """The versions of `model` a traffic split sends canary traffic to (counted as `canary`)."""
        self._canaries = {key for key in self._canaries if key[0] != model} | {(model, v) for v in versions}
        for key in [key for key in self._tables if key[0] == model]:
            del self._tables[key]

    def _fleet_changed(self) -> None:
        self._tables.clear()
        self._healthy_counts.clear()
        # Backends found by DNS come and go: forget what was learned of those that left.
        present = {id(b) for pool in self._fleet.pools.values() for b in pool}
        for key in [key for key in self._estimates if id(key[2]) not in present]:
            del self._estimates[key]

    def _slo_s(self, model: str) -> float | None:
        route = self._routes.get(model) if self._routes is not None else None
        return route.latency_slo_ms / 1e3 if route is not None and route.latency_slo_ms is not None else None

    def _row(self, model: str, version: str, pool: str, slo_s: float | None) -> PoolRow:
        # routable: healthy and not ejected by outlier detection (gateway/upstream/outlier.py)
        backends = [b for b in self._fleet.pools.get(pool, ()) if b.routable and b.serves(model, version)]
        estimates = [self._estimate(model, version, b) for b in backends]
        gate = None
        if slo_s is not None:
            gate = self._gates.get((model, version, pool))
            if gate is None:
                config = self._config
                gate = self._gates[(model, version, pool)] = PoolGate(
                    pool, slo_s, config.slo_spill_ratio, config.slo_return_ratio, config.probe_interval_s
                )
        for estimate in estimates:
            estimate.gate, estimate.peers = gate, estimates
        return PoolRow(pool, backends, estimates, gate)

    def _estimate(self, model: str, version: str, backend: Backend) -> LatencyEstimate:
        key = (model, version, backend)
        estimate = self._estimates.get(key)
        if estimate is None:
            estimate = self._estimates[key] = LatencyEstimate()
        return estimate

    def _table(self, model: str, version: str) -> list[PoolRow]:
        key = (model, version)
        table = self._tables.get(key)
        if table is None:
            slo_s = self._slo_s(model)
            table = [self._row(model, version, pool, slo_s) for pool in self.pools_of(model) or ()]
            self._tables[key] = table
        return table

    def healthy_count(self, model: str, version: str) -> int:
        """Healthy backends that serve the model, over all its pools (asked by batching on every
        request: counted once per fleet change)."""
        key = (model, version)
        count = self._healthy_counts.get(key)
        if count is None:
            count = self._healthy_counts[key] = sum(len(row.backends) for row in self._table(model, version))
        return count

    def decisions_by_reason(self) -> dict[str, int]:
        """Backends picked, by reason, over all pools."""
        totals = dict.fromkeys(REASONS, 0)
        for (_, reason), count in list(self.decisions.items()):
            totals[reason] = totals.get(reason, 0) + count
        return totals

    def _count(self, pool: str, reason: str) -> None:
        key = (pool, reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def _two_choices(self, backends: list[Backend], estimates: list[LatencyEstimate]) -> int:
        """Index of the better of two distinct random backends by load score (the only one if alone)."""
        count = len(backends)
        if count == 1:
            return 0
        first = int(self._random() * count)
        second = int(self._random() * (count - 1))
        if second >= first:
            second += 1
        now, tau = self._clock(), self._config.ewma_tau_s
        a, b = backends[first], backends[second]
        a_score = load_score(estimates[first], a.outstanding, now, tau)
        return first if a_score <= load_score(estimates[second], b.outstanding, now, tau) else second

    def choose(self, model: str, version: str, exclude: Backend | tuple | None = None) -> tuple[Backend, str]:
        """A backend for the model from the cheapest pool that has a healthy one (predicted to meet
        the model's latency objective, when it has one), and why it was picked.

        `exclude` is the backend that just failed the request (or a tuple of those that did, the
        dispatcher's retries): picking another is a failover. May set `self.probe` (see there).
        """
        return self._place(model, version, exclude, True)

    def _place(self, model: str, version: str, exclude: Backend | None, live: bool) -> tuple[Backend, str]:
        table = self._table(model, version)
        fallback: tuple[float, Backend, int] | None = None  # fastest predicted, when no pool meets the objective
        probe: Backend | None = None  # a backend of a closed pool due a measurement
        now = 0.0
        for rank, row in enumerate(table):
            backends, estimates = row.backends, row.estimates
            if exclude is not None and _any_in(exclude, backends):
                kept = [i for i, b in enumerate(backends) if not _is_excluded(b, exclude)]
                backends, estimates = [backends[i] for i in kept], [estimates[i] for i in kept]
            if not backends:
                continue
            index = self._two_choices(backends, estimates)
            chosen = backends[index]
            gate = row.gate
            if gate is not None:
                predicted = estimates[index].predict(chosen.outstanding)
                if not gate.open:
                    now = now or self._clock()
                    if live and exclude is None and probe is None and self.probe is None and gate.probe_due(now):
                        probe = chosen
                if not gate.open or predicted > gate.spill_s:
                    if fallback is None or predicted < fallback[0]:
                        fallback = (predicted, chosen, rank)
                    continue
            if probe is not None:
                self._send_probe(probe, chosen)
            return chosen, self._decided(model, version, row.pool, rank, exclude, live)
        if fallback is not None:
            _, chosen, rank = fallback
            if probe is not None:
                self._send_probe(probe, chosen)
            return chosen, self._decided(model, version, chosen.pool, rank, exclude, live)
        self._refuse(model, version, exclude)

    def choose_for_sequence(self, model: str, version: str, sequence_id: object,
                            exclude: Backend | None = None) -> tuple[Backend, str]:
        """The backend a sequence starts on: in the first pool with a healthy backend, the one
        rendezvous hashing ranks first for (model, sequence id). Every process that sees the same
        healthy backends picks the same one (gateway/routing/rendezvous.py), so a sequence continued
        through another worker or replica finds its state. (No latency placement: a sequence's
        backend is fixed by its id, not by load.)"""
        sequence_hash = sequence_key(model, sequence_id)
        for rank, row in enumerate(self._table(model, version)):
            candidates = [b for b in row.backends if not _is_excluded(b, exclude)] if exclude is not None else row.backends
            if candidates:
                chosen = self._rendezvous.pick(sequence_hash, candidates)
                return chosen, self._decided(model, version, row.pool, rank, exclude, True)
        self._refuse(model, version, exclude)

    def _refuse(self, model: str, version: str, exclude: Backend | None) -> None:
        if self.pools_of(model) is None:
            raise NotFound(f"model '{shown(model)}' is not routed by this gateway")
        pools = ", ".join(self.pools_of(model) or ())
        raise Unavailable(
            f"model '{shown(model)}'{f' version {shown(version)}' if version else ''}: no healthy backend can serve "
            "it now" + (" other than the one that just failed" if exclude is not None else "") + "; retry later",
            detail=f"pools [{pools}]")

    def _send_probe(self, probe: Backend, chosen: Backend) -> None:
        """Ask the dispatcher for a probe copy, unless the live request itself goes to that pool
        (no pool met the objective and the closed one is the fastest): it measures the pool then."""
        if probe.pool != chosen.pool:
            self.probe = probe
            self._count(probe.pool, PROBE)

    def _decided(self, model: str, version: str, pool: str, rank: int, exclude: Backend | None, live: bool) -> str:
        if not live:
            return SHADOW  # counted by the caller
        if exclude is not None:
            reason = FAILOVER
        elif rank:
            reason = SPILL
        elif self._canaries and (model, version) in self._canaries:
            reason = CANARY
        else:
            reason = PREFERRED
        key = (pool, reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return reason

    def choose_shadow(self, model: str, version: str, pool: str = "") -> Backend:
        """A backend for a shadow copy: from `pool` (any pool of the fleet), or placed as live traffic
        of that version would be. Counted as a `shadow` decision; never probes."""
        if pool:
            backends = [b for b in self._fleet.pools.get(pool, ()) if b.healthy and b.serves(model, version)]
            if not backends:
                raise Unavailable(f"shadow of model '{model}' version {version or '(default)'}: no healthy backend in pool {pool}")
            estimates = [self._estimate(model, version, b) for b in backends]
            chosen = backends[self._two_choices(backends, estimates)]
        else:
            chosen, _ = self._place(model, version, None, False)
        self._count(chosen.pool, SHADOW)
        return chosen

    def observe(self, model: str, version: str, backend: Backend, elapsed_s: float, ahead: int) -> None:
        """A call of `model` `version` on `backend` took `elapsed_s` with `ahead` requests already in
        flight there when it was sent: update its service time, and its pool's gate."""
        estimate = self._estimates.get((model, version, backend)) or self._estimate(model, version, backend)
        now = self._clock()
        estimate.observe(elapsed_s, ahead, now, self._config.ewma_tau_s)
        estimate.update_gate(now)

    def service_times(self) -> dict[tuple[str, str, str, str], float]:
        """{(model, version, pool, backend address): EWMA service time in seconds} of observed backends."""
        return {(model, version, backend.pool, backend.address): estimate.service_s
                for (model, version, backend), estimate in list(self._estimates.items()) if estimate.samples}

    def placement(self) -> dict:
        """Live placement state for the snapshot: per model version and pool, the gate and each
        backend's service time, outstanding requests and predicted latency (ms)."""
        state: dict = {}
        for (model, version), table in list(self._tables.items()):
            pools = {}
            for row in table:
                pools[row.pool] = {
                    "gate": None if row.gate is None else ("open" if row.gate.open else "closed"),
                    "transitions": 0 if row.gate is None else row.gate.transitions,
                    "backends": {
                        b.address: {
                            "service_ms": round(e.service_s * 1e3, 3),
                            "outstanding": b.outstanding,
                            "predicted_ms": round(e.predict(b.outstanding) * 1e3, 3),
                            "samples": e.samples,
                        }
                        for b, e in zip(row.backends, row.estimates)
                    },
                }
            state[f"{model}:{version}" if version else model] = {"slo_ms": None if self._slo_s(model) is None else self._slo_s(model) * 1e3, "pools": pools}
        return state


def _is_excluded(backend: Backend, exclude) -> bool:
    """`exclude` is one backend or a tuple of them (the backends a request already failed on)."""
    return backend in exclude if isinstance(exclude, tuple) else backend is exclude


def _any_in(exclude, backends: list) -> bool:
    return any(b in backends for b in exclude) if isinstance(exclude, tuple) else exclude in backends
