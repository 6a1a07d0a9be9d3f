"""`rollout:` — where rollout state and the audit log live, and how a rollout steps and judges."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError


@dataclass(frozen=True)
class RolloutConfig:
    state_file: str | None = None
    """JSON file of every model's rollout state (live version, split, step): a restarted gateway
    restores the split and resumes a rollout that was running. None: kept in memory only."""
    audit_log: str | None = None
    """Hash-chained JSONL audit log (gateway/audit): every deploy, shift, promote, rollback and
    unload with its evidence. None: not recorded."""
    repository: str | None = None
    """The model repository folder the backends load from (a shared volume), when this gateway can
    read it: a candidate made by `tensorgate package` is verified against its manifest's digest
    first, and a tampered one is refused."""
    steps: tuple[float, ...] = (5.0, 25.0, 50.0)
    """Candidate traffic percentages, one step each; promotion (100 %) follows the last."""
    step_seconds: float = 30.0
    """A step lasts at least this long…"""
    min_requests: int = 200
    """…and until the candidate has answered this many requests in it."""
    step_timeout_s: float = 600.0
    """A step that has not seen min_requests by then rolls back ("not enough traffic to judge")."""
    check_interval_s: float = 0.5
    """How often the checks run during a step: a failing candidate is rolled back at once."""
    min_evidence: int = 20
    """Candidate requests before a check may fail it (fewer: too little to judge)."""
    max_error_rate_increase: float = 0.01
    """Fail when the candidate's error rate exceeds the live version's by more than this."""
    latency_ratio: float = 1.5
    """Fail when the candidate's p99 exceeds this × the live version's p99 (+ 1 ms) and, where the
    model has a latency_slo_ms, also the objective: a slowdown both versions share is the machine's,
    not the candidate's."""
    min_latency_evidence: int = 50
    """Candidate answers before the latency check may fail it (a p99 of fewer is about the maximum)."""
    warmup_answers: int = 10
    """The candidate's first answers, left out of its p99: a just-loaded version pays its warm-up
    (a Python backend's first execute, caches) on them."""
    max_output_psi: float = 0.25
    """Fail when the PSI between the live version's and the candidate's outputs exceeds this."""
    output: str = ""
    """The output tensor compared (empty: the first)."""
    output_bins: int = 16
    min_output_values: int = 500
    """Output values of each version before the output check may fail a candidate."""
    load_timeout_s: float = 120.0
    """How long loading the candidate on every backend may take."""
    unload_previous: bool = False
    """Unload the previous version after a promotion (else it stays loaded for a quick rollback)."""

    def validate(self, path: str) -> None:
        if not self.steps or any(not 0 < step < 100 for step in self.steps) or list(self.steps) != sorted(self.steps):
            raise ConfigError(f"{path}.steps", "expected increasing percentages between 0 and 100 (promotion follows the last)")
        for name in ("step_seconds", "step_timeout_s", "check_interval_s", "load_timeout_s", "latency_ratio"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{path}.{name}", "expected a positive number")
        if self.min_requests < 1 or self.min_evidence < 1 or self.min_output_values < 1 or self.min_latency_evidence < 1 or self.warmup_answers < 0:
            raise ConfigError(f"{path}.min_requests", "expected at least 1")
        if not 0 <= self.max_error_rate_increase <= 1:
            raise ConfigError(f"{path}.max_error_rate_increase", "expected a fraction between 0 and 1")
        if self.output_bins < 2:
            raise ConfigError(f"{path}.output_bins", "expected at least 2 bins")
