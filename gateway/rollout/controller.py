"""`RolloutController`: one gated rollout per model at a time, run as a task on the gateway's loop.

A rollout of version C of a model whose live version is L:

1. verify C against its package manifest when the repository folder is readable here (a tampered
   folder is refused before anything changes);
2. pin the model's requests that name no version to L (a split {L: 1}): loading C makes it Triton's
   default version, and live traffic must not follow it there;
3. load C beside the versions already loaded on every backend of the model's pools and wait until
   every backend (and the gateway's health view) has it ready — a load that fails anywhere puts
   the backends that did load it back as they were: nothing else changes;
4. optionally a shadow step: copies of live traffic go to C, answers discarded, and are judged;
5. canary steps: C gets `steps[i]` % of the requests naming no version; each step lasts at least
   `step_seconds` and until C has answered `min_requests`, while the checks (evidence.py: error
   rate, p99 against the model's latency objective or the live p99, output PSI) run every
   `check_interval_s` — the first failing check rolls back at once, so C never gets more than
   the share of the step it failed in;
6. promote: every request naming no version goes to C ({C: 1}); L stays loaded for a quick
   rollback unless `unload_previous`.

Every decision goes to the audit log with its evidence, and the state to the state file, so a
restarted gateway puts the split back and resumes a running rollout at its step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument, NotFound
from gateway.pipeline.exchange import Exchange
from gateway.rollout.config import RolloutConfig
from gateway.rollout.evidence import ShadowEvidence, VersionEvidence, failed, judge
from gateway.rollout.state import ModelRollout, RolloutStore
from gateway.routing.config import ShadowConfig
from gateway.routing.router import Router
from gateway.traffic.stage import TrafficStage
from gateway.traffic.stats import OutputComparison
from gateway.upstream import repository
from gateway.upstream.backend import Backend
from gateway.upstream.fleet import Fleet

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "gateway"  # the actor of automatic decisions in the audit log


class _Watch:
    """The evidence of one running rollout: both versions' requests, and their outputs side by side."""

    def __init__(self, live: str, candidate: str, config: RolloutConfig) -> None:
        self.live, self.candidate = live, candidate
        self.versions = {live: VersionEvidence(), candidate: VersionEvidence()}
        self.outputs = OutputComparison(config.output, config.output_bins, config.min_output_values)


class RolloutController:
    def __init__(self, config: RolloutConfig, core: Callable[[], object],
                 on_live: Callable[[str, str, str | None, Path | None], None] | None = None) -> None:
        """`core()` is the gateway's current set of backend-holding stages (`.traffic`, `.router`,
        `.fleet`): a config reload replaces them, and the controller always acts on the current ones.
        `on_live(model, version, digest, reference)` is told which version serves a model (at start
        for the stored ones, then at each promotion and rollback): the drift stage records its digest
        in retraining captures and installs the drift reference packaged with it (or None)."""
        self.config = config
        self.on_live = on_live
        self._core = core
        self.store = RolloutStore(config.state_file)
        self.audit = None
        if config.audit_log:
            from gateway.audit.log import AuditLog

            self.audit = AuditLog(config.audit_log)
        self._tasks: dict[str, asyncio.Task] = {}
        self._watches: dict[str, _Watch] = {}

    @property
    def traffic(self) -> TrafficStage:
        return self._core().traffic

    @property
    def router(self) -> Router:
        return self._core().router

    @property
    def fleet(self) -> Fleet:
        return self._core().fleet

    def reapply(self) -> None:
        """Put every model's split on the current traffic stage (after a config reload rebuilt it)."""
        for model, state in self.store.models.items():
            if state.weights:
                self.traffic.set_split(model, state.weights)

    def __repr__(self) -> str:
        running = sorted(model for model, state in self.store.models.items() if state.running)
        return f"<RolloutController running={running} {self.store!r}>"

    # ---- the pipeline side --------------------------------------------------------------------

    def observer(self, exchange: Exchange, response, error) -> None:
        """Record a finished request of a model under rollout (others: one dict lookup)."""
        watch = self._watches.get(exchange.entry.name)
        if watch is None:
            return
        version = exchange.entry.version
        evidence = watch.versions.get(version)
        if evidence is None:
            return
        evidence.record(exchange.elapsed_ns / 1e9, error)
        if response is not None:
            watch.outputs.add("live" if version == watch.live else "shadow", response)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Put every stored split back, and resume the rollouts that were running."""
        self.reapply()
        for model, state in self.store.models.items():
            if state.live is not None:
                self._tell_live(state, install_reference=False)  # the drift stage loaded its own at start
            if state.running:
                log.info("resuming the rollout of %s version %s at step %d", model, state.candidate, state.step)
                self._launch(state, resume=True)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the admin API -------------------------------------------------------------------------

    def begin(self, model: str, version: str, *, actor: str, reason: str = "", steps: list[float] | None = None,
              step_seconds: float = 0.0, min_requests: int = 0, shadow_first: bool = False) -> ModelRollout:
        """Start rolling out `version` of `model`; returns the state (status loading)."""
        if not model or not version.isdigit():
            raise InvalidArgument(f"a rollout needs a model name and a numeric version, got {model!r} and {version!r}")
        if not self.router.routes(model):
            raise NotFound(f"model '{model}' is not routed by this gateway")
        steps = list(steps or self.config.steps)
        if any(not 0 < step < 100 for step in steps) or steps != sorted(steps):
            raise InvalidArgument(f"steps must be increasing percentages between 0 and 100, got {steps}")
        state = self.store.of(model)
        if state.running:
            raise FailedPrecondition(f"model '{model}' is already rolling out version {state.candidate} "
                                     f"({state.status}, step {state.step + 1} of {len(state.steps)}); roll it back first")
        if version == state.live:
            raise FailedPrecondition(f"version {version} of '{model}' is already live")
        state.candidate, state.steps, state.step = version, steps, -1
        state.step_seconds = step_seconds or self.config.step_seconds
        state.min_requests = min_requests or self.config.min_requests
        state.shadow_first = shadow_first
        state.actor, state.reason, state.evidence, state.history = actor, reason, {}, []
        state.started = time.time()
        self._set_status(state, "loading", f"loading version {version}")
        self._launch(state, resume=False)
        return state

    async def rollback(self, model: str, *, actor: str, reason: str = "") -> ModelRollout:
        """Stop a running rollout (all traffic to the live version, the candidate unloaded), or after
        a promotion go back to the previous version (loading it again where it was unloaded)."""
        state = self.store.models.get(model)
        if state is None or (not state.running and state.previous is None):
            raise FailedPrecondition(f"model '{model}' has no rollout to roll back")
        task = self._tasks.pop(model, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if state.running:
            await self._roll_back(state, actor, reason or "rolled back by an operator", state.evidence)
            return state
        back_to, leaving = state.previous, state.live
        await self._ensure_loaded(model, back_to)
        self._split(state, {back_to: 1.0})
        state.live, state.previous = back_to, leaving
        self._set_status(state, "rolled-back", reason or f"back to version {back_to}")
        self._audit("rollback", state, back_to, actor, state.reason, {"from": leaving})
        self._tell_live(state)
        return state

    def states(self, model: str = "") -> dict:
        """{model: state} (one model or every one), with the versions each backend has ready."""
        if model and model not in self.store.models:
            raise NotFound(f"model '{model}' has no rollout state")
        chosen = [model] if model else sorted(self.store.models)
        result = {}
        for name in chosen:
            state = self.store.models[name].as_dict()
            watch = self._watches.get(name)
            if watch is not None:
                state["live_evidence"] = {v: e.summary() for v, e in watch.versions.items()}
            state["backends"] = {
                backend.address: sorted((v for m, v in backend.ready_models if m == name and v), key=int)
                for backend in self._backends(name)
            }
            result[name] = state
        return result

    # ---- the rollout itself --------------------------------------------------------------------

    def _launch(self, state: ModelRollout, resume: bool) -> None:
        task = asyncio.ensure_future(self._run(state, resume))
        self._tasks[state.model] = task
        task.add_done_callback(lambda done, model=state.model: self._finished(model, done))

    def _finished(self, model: str, task: asyncio.Task) -> None:
        if self._tasks.get(model) is task:
            del self._tasks[model]
        if not task.cancelled() and task.exception() is not None:
            log.error("rollout of %s stopped by an unexpected error", model, exc_info=task.exception())

    async def _run(self, state: ModelRollout, resume: bool) -> None:
        model, candidate = state.model, state.candidate
        try:
            if resume and state.status != "loading":  # the evidence starts again after a restart
                self._watches[model] = _Watch(state.live, candidate, self.config)
            if state.status == "loading":
                if not await self._load(state):
                    return
            if state.status in ("loading", "shadow") and state.shadow_first:
                self._set_status(state, "shadow", "shadow copies of live traffic to the candidate")
                if not await self._shadow_step(state):
                    return
            first = max(state.step, 0) if resume and state.status == "canary" else 0
            for index in range(first, len(state.steps)):
                if not await self._canary_step(state, index):
                    return
            await self._promote(state)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — whatever broke, the live version must keep all traffic
            log.exception("rollout of %s version %s failed", model, candidate)
            await self._roll_back(state, SYSTEM_ACTOR, f"the rollout failed: {error}", state.evidence)

    async def _load(self, state: ModelRollout) -> bool:
        model, candidate = state.model, state.candidate
        backends = self._backends(model)
        if not backends:
            return self._fail(state, f"model '{model}' has no healthy backend to load version {candidate} on")
        digest = self._verify(state)
        if digest is False:
            return False
        if state.live is None:  # the first rollout of this model: live is what the backends serve now
            loaded = set.intersection(*[set(await repository.loaded_versions(b, model)) for b in backends])
            loaded.discard(candidate)
            if not loaded:
                return self._fail(state, f"no version of '{model}' is loaded on every backend: nothing is live")
            state.live = max(loaded, key=int)
        live = state.live
        self._watches[model] = _Watch(live, candidate, self.config)
        pinned_before = dict(state.weights)
        self._split(state, {live: 1.0})  # requests naming no version stay on live while Triton's default moves
        done: list[tuple[Backend, list[str], dict]] = []
        try:
            for backend in backends:  # one at a time: the others keep serving while it loads
                before = await repository.loaded_versions(backend, model)
                config = await repository.model_config(backend, model)
                done.append((backend, before, config))
                await self._load_beside(backend, model, before, {live, candidate}, config, ready=candidate)
        except GatewayError as error:
            for backend, before, config in done:  # put back what was loaded before
                try:
                    await self._reload(backend, model, before, config)
                except GatewayError:
                    log.exception("could not restore %s's versions of %s", backend.address, model)
            self._split(state, pinned_before)
            self._watches.pop(model, None)
            return self._fail(state, f"loading version {candidate} failed; nothing changed: {error.message}")
        self._audit("deploy", state, candidate, state.actor, state.reason or f"loaded on {len(backends)} backends",
                    {"backends": [b.address for b in backends], "live": live})
        log.info("rollout of %s: version %s loaded on %d backends", model, candidate, len(backends))
        return True

    def _verify(self, state: ModelRollout) -> str | None | bool:
        """The candidate's digest from its package manifest (None when no repository is configured);
        False when it was refused: not a package, or one whose files no longer match its manifest."""
        if not self.config.repository:
            return None
        from gateway.packaging.errors import PackageError
        from gateway.packaging.repository import verify_version

        folder = Path(self.config.repository) / state.model
        if not (folder / state.candidate).is_dir():
            return self._fail(state, f"version {state.candidate} is not in the repository {folder}")
        try:
            manifest = verify_version(folder, int(state.candidate))
        except PackageError as error:
            self._fail(state, f"version {state.candidate} is refused: {error}")
            return False
        digest = manifest.get("digest")
        if digest:
            state.digests[state.candidate] = digest
        return digest

    async def _shadow_step(self, state: ModelRollout) -> bool:
        model = state.model
        watch = self._watches[model]
        target = self.traffic.set_shadow(model, ShadowConfig(version=state.candidate, output=self.config.output))
        try:
            return await self._hold(state, "shadow", lambda: (ShadowEvidence(target.counters), target.outputs))
        finally:
            self.traffic.clear_shadow(model)
            watch.outputs = OutputComparison(self.config.output, self.config.output_bins, self.config.min_output_values)

    async def _canary_step(self, state: ModelRollout, index: int) -> bool:
        share = state.steps[index] / 100.0
        state.step = index
        self._split(state, {state.live: 1.0 - share, state.candidate: share})
        self._set_status(state, "canary", f"step {index + 1} of {len(state.steps)}: {state.steps[index]:g} % to the candidate")
        self._audit("shift", state, state.candidate, SYSTEM_ACTOR, state.reason,
                    {"step": index + 1, "weights": dict(state.weights)})
        watch = self._watches[state.model]
        return await self._hold(state, f"canary {state.steps[index]:g} %",
                                lambda: (watch.versions[state.candidate], watch.outputs))

    async def _hold(self, state: ModelRollout, what: str, candidate_side) -> bool:
        """Run the checks until the step has lasted long enough with enough candidate requests
        (True), or a check fails or the step times out (rolled back: False)."""
        loop = asyncio.get_running_loop()
        watch = self._watches[state.model]
        slo = self.router.route_of(state.model)
        slo_ms = slo.latency_slo_ms if slo is not None else None
        started = loop.time()
        candidate, _ = candidate_side()
        requests_before, live_before = candidate.requests, watch.versions[state.live].requests
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            candidate, outputs = candidate_side()
            checks = judge(self.config, slo_ms, watch.versions[state.live], candidate, outputs)
            evidence = {"step": what, "live": watch.versions[state.live].summary(), "candidate": candidate.summary(),
                        "checks": checks}
            state.evidence = evidence
            bad = failed(checks)
            if bad:
                reasons = "; ".join(f"{c['check']} {_fmt(c['value'])} > {_fmt(c['limit'])}" for c in bad)
                await self._roll_back(state, SYSTEM_ACTOR, f"{what}: {reasons}", evidence)
                return False
            elapsed = loop.time() - started
            if elapsed >= state.step_seconds and candidate.requests - requests_before >= state.min_requests:
                state.history.append({"step": what, "seconds": round(elapsed, 3), "requests": {
                    "live": watch.versions[state.live].requests - live_before,
                    "candidate": candidate.requests - requests_before}})
                self.store.save()
                return True
            if elapsed >= self.config.step_timeout_s:
                await self._roll_back(state, SYSTEM_ACTOR,
                                      f"{what}: not enough traffic to judge ({candidate.requests - requests_before} "
                                      f"of {state.min_requests} candidate requests in {elapsed:.0f} s)", evidence)
                return False

    async def _promote(self, state: ModelRollout) -> None:
        model, candidate, previous = state.model, state.candidate, state.live
        self._split(state, {candidate: 1.0})
        state.previous, state.live, state.candidate, state.step = previous, candidate, None, len(state.steps)
        self._set_status(state, "promoted", f"version {candidate} serves all traffic")
        self._audit("promote", state, candidate, SYSTEM_ACTOR, "every check held at every step", state.evidence)
        self._tell_live(state)
        self._watches.pop(model, None)
        if self.config.unload_previous:
            await self._set_versions(model, [candidate])
            self._audit("unload", state, previous, SYSTEM_ACTOR, "unload_previous", {})

    async def _roll_back(self, state: ModelRollout, actor: str, reason: str, evidence: dict) -> None:
        """All traffic to the live version at once, then the candidate unloaded."""
        model, candidate, live = state.model, state.candidate, state.live
        self.traffic.clear_shadow(model)
        if live is not None:
            self._split(state, {live: 1.0})
        state.candidate, state.step = None, -1
        self._set_status(state, "rolled-back", reason)
        state.evidence = evidence
        self._audit("rollback", state, candidate, actor, reason, evidence)
        self._watches.pop(model, None)
        log.warning("rollout of %s version %s rolled back: %s", model, candidate, reason)
        if candidate is not None and live is not None:
            try:
                await self._set_versions(model, None, drop=candidate)
                self._audit("unload", state, candidate, actor, "rolled back", {})
            except GatewayError as error:
                log.error("could not unload version %s of %s: %s", candidate, model, error.message)

    async def _reload(self, backend: Backend, model: str, versions: list[str], config: dict) -> None:
        """Load exactly `versions` on one backend and wait until it is ready and healthy again (a
        strict-readiness Triton reports not ready while it loads: the gateway sends its requests
        to the other backends meanwhile)."""
        await repository.load_versions(backend, model, versions, config)
        if not await repository.wait_server_ready(backend, self.config.load_timeout_s):
            raise FailedPrecondition(f"backend {backend.address} was not ready again within "
                                     f"{self.config.load_timeout_s:g} s of loading {model} versions {versions}")
        await self.fleet.check(backend)

    async def _set_versions(self, model: str, versions: list[str] | None, drop: str | None = None) -> None:
        """Load exactly `versions` (or what is loaded minus `drop`) on every backend of the model."""
        for backend in self._backends(model):
            loaded = await repository.loaded_versions(backend, model)
            wanted = versions if versions is not None else [v for v in loaded if v != drop]
            if wanted and sorted(wanted, key=int) != loaded:
                await self._reload(backend, model, wanted, await repository.model_config(backend, model))

    async def _ensure_loaded(self, model: str, version: str) -> None:
        for backend in self._backends(model):
            loaded = await repository.loaded_versions(backend, model)
            if version not in loaded:
                config = await repository.model_config(backend, model)
                await self._load_beside(backend, model, loaded, {version}, config, ready=version)

    async def _load_beside(self, backend: Backend, model: str, loaded: list[str], versions: set[str], config: dict,
                           ready: str) -> None:
        """Load `versions` beside the `loaded` ones on one backend; raise unless version `ready` is
        ready there within the load timeout."""
        await self._reload(backend, model, sorted({*loaded, *versions}, key=int), config)
        if not await repository.wait_ready(backend, model, ready, self.config.load_timeout_s):
            raise FailedPrecondition(f"version {ready} of '{model}' was not ready on {backend.address} "
                                     f"within {self.config.load_timeout_s:g} s")

    # ---- helpers -------------------------------------------------------------------------------

    def _tell_live(self, state: ModelRollout, install_reference: bool = True) -> None:
        if self.on_live is None:
            return
        reference = None
        if install_reference and self.config.repository:
            from gateway.packaging.repository import REFERENCE_FILE

            packaged = Path(self.config.repository) / state.model / state.live / REFERENCE_FILE
            reference = packaged if packaged.is_file() else None
        try:
            self.on_live(state.model, state.live, state.digests.get(state.live), reference)
        except Exception:  # noqa: BLE001 — a reference that does not load never undoes a promotion
            log.exception("the drift stage could not take version %s of %s", state.live, state.model)

    def _backends(self, model: str) -> list[Backend]:
        """Every healthy backend of the model's pools (every pool when the model has no route)."""
        route = self.router.route_of(model)
        pools = route.pools if route is not None and route.pools else list(self.fleet.pools)
        return [backend for pool in pools for backend in self.fleet.pools.get(pool, ()) if backend.healthy]

    def _split(self, state: ModelRollout, weights: dict[str, float]) -> None:
        state.weights = dict(weights)
        if weights:
            self.traffic.set_split(state.model, weights)
        else:
            self.traffic.clear_split(state.model)
        self.store.save()

    def _set_status(self, state: ModelRollout, status: str, reason: str) -> None:
        state.status, state.reason, state.updated = status, reason, time.time()
        self.store.save()

    def _fail(self, state: ModelRollout, reason: str) -> bool:
        candidate = state.candidate
        state.candidate, state.step = None, -1
        self._set_status(state, "failed", reason)
        self._audit("deploy", state, candidate, state.actor or SYSTEM_ACTOR, reason, {"failed": True})
        log.error("rollout of %s version %s: %s", state.model, candidate, reason)
        return False

    def _audit(self, action: str, state: ModelRollout, version: str | None, actor: str, reason: str, evidence: dict) -> None:
        if self.audit is None:
            return
        try:
            self.audit.append(action=action, model=state.model, actor=actor or SYSTEM_ACTOR,
                              version=int(version) if version else None, digest=state.digests.get(version or ""),
                              reason=reason, evidence=evidence)
        except Exception:  # noqa: BLE001 — an audit failure is logged, never stops a rollback
            log.exception("could not append to the audit log %s", self.config.audit_log)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
