"""Model (and version) → its pools in preference order → a healthy backend, by power of two choices.

The candidate lists are derived from the fleet and rebuilt only when the fleet's health or model
sets change (its `generation`), so a routing decision on the hot path is two dict lookups and two
random picks.
"""

from __future__ import annotations

import random

from gateway.errors import NotFound, Unavailable, shown
from gateway.routing.config import ModelRoute
from gateway.routing.rendezvous import Rendezvous, sequence_key
from gateway.upstream.backend import Backend
from gateway.upstream.fleet import Fleet

#: Why a backend was picked: the model's first pool had one; an earlier pool had none healthy;
#: the backend first picked was unavailable and this is the retry; a sequence is bound to it.
PREFERRED, SPILL, FAILOVER, STICKY = "preferred", "spill", "failover", "sticky"


class Router:
    def __init__(self, fleet: Fleet, routes: dict[str, ModelRoute] | None, rng: random.Random | None = None) -> None:
        self._fleet = fleet
        self._routes = routes
        self._default_pools = tuple(fleet.pools)
        self._random = rng or random.Random()
        self._tables: dict[tuple[str, str], list[list[Backend]]] = {}
        self._healthy_counts: dict[tuple[str, str], int] = {}
        fleet.on_change(self._fleet_changed)
        self.decisions: dict[tuple[str, str], int] = {}  # (pool, reason) -> backends picked
        self._rendezvous = Rendezvous()

    def __repr__(self) -> str:
        return f"<Router routes={'all' if self._routes is None else sorted(self._routes)} decisions={self.decisions}>"

    def pools_of(self, model: str) -> tuple[str, ...] | None:
        """The model's pools in preference order; None if the config does not route it."""
        if self._routes is None:
            return self._default_pools
        route = self._routes.get(model)
        return route.pools if route is not None else None

    def routes(self, model: str) -> bool:
        return self.pools_of(model) is not None

    def sequence_idle_timeout_s(self, model: str) -> float | None:
        """The configured idle timeout of the model's sequences, or None to take the model's own."""
        route = self._routes.get(model) if self._routes is not None else None
        return route.sequence_idle_timeout_s if route is not None else None

    def _fleet_changed(self) -> None:
        self._tables.clear()
        self._healthy_counts.clear()

    def _table(self, model: str, version: str) -> list[list[Backend]]:
        key = (model, version)
        table = self._tables.get(key)
        if table is None:
            pools = self.pools_of(model) or ()
            table = [
                [b for b in self._fleet.pools[pool] if b.healthy and b.serves(model, version)] for pool in pools
            ]
            self._tables[key] = table
        return table

    def healthy_count(self, model: str, version: str) -> int:
        """Healthy backends that serve the model, over all its pools (asked by batching on every
        request: counted once per fleet change)."""
        key = (model, version)
        count = self._healthy_counts.get(key)
        if count is None:
            count = self._healthy_counts[key] = sum(len(candidates) for candidates in self._table(model, version))
        return count

    def decisions_by_reason(self) -> dict[str, int]:
        """Backends picked, by reason, over all pools."""
        totals = dict.fromkeys((PREFERRED, SPILL, FAILOVER), 0)
        for (_, reason), count in list(self.decisions.items()):
            totals[reason] = totals.get(reason, 0) + count
        return totals

    def choose(self, model: str, version: str, exclude: Backend | None = None) -> tuple[Backend, str]:
        """A healthy backend for the model from its most preferred pool that has one, and why.

        `exclude` is the backend that just failed the request: picking another is a failover.
        """
        for rank, candidates in enumerate(self._table(model, version)):
            if exclude is not None:
                candidates = [b for b in candidates if b is not exclude]
            if not candidates:
                continue
            if len(candidates) == 1:
                chosen = candidates[0]
            else:
                first, second = self._random.sample(candidates, 2)
                chosen = first if first.outstanding <= second.outstanding else second
            reason = FAILOVER if exclude is not None else (PREFERRED if rank == 0 else SPILL)
            key = (chosen.pool, reason)
            self.decisions[key] = self.decisions.get(key, 0) + 1
            return chosen, reason
        self._refuse(model, version, exclude)

    def choose_for_sequence(self, model: str, version: str, sequence_id: object,
                            exclude: Backend | None = None) -> tuple[Backend, str]:
        """The backend a sequence starts on: in the most preferred pool with a healthy backend, the
        one rendezvous hashing ranks first for (model, sequence id). Every process that sees the
        same healthy backends picks the same one (gateway/routing/rendezvous.py), so a sequence
        continued through another worker or replica finds its state."""
        sequence_hash = sequence_key(model, sequence_id)
        for rank, candidates in enumerate(self._table(model, version)):
            if exclude is not None:
                candidates = [b for b in candidates if b is not exclude]
            if candidates:
                chosen = self._rendezvous.pick(sequence_hash, candidates)
                return chosen, self._decided(chosen, rank, exclude)
        self._refuse(model, version, exclude)

    def _decided(self, chosen: Backend, rank: int, exclude: Backend | None) -> str:
        """Count the pick by pool and reason (as `choose` does inline: it runs on every request)."""
        reason = FAILOVER if exclude is not None else (PREFERRED if rank == 0 else SPILL)
        key = (chosen.pool, reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return reason

    def _refuse(self, model: str, version: str, exclude: Backend | None) -> None:
        if self.pools_of(model) is None:
            raise NotFound(f"model '{shown(model)}' is not routed by this gateway")
        pools = ", ".join(self.pools_of(model) or ())
        raise Unavailable(
            f"model '{shown(model)}'{f' version {shown(version)}' if version else ''}: no healthy backend can serve "
            "it now" + (" other than the one that just failed" if exclude is not None else "") + "; retry later",
            detail=f"pools [{pools}]")
