"""Config of the routing stage: which pools serve which model, its latency objective, its versions' traffic."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError

#: The gRPC metadata key and request parameter a client sets to keep its requests on one version.
STICKY_KEY = "tensorgate-sticky-key"


@dataclass(frozen=True)
class ShadowConfig:
    """A shadow target of a model: a copy of live traffic goes there too; its answers are discarded
    and its latency, errors and outputs recorded apart (admin snapshot `traffic`)."""

    version: str = ""
    """The model version the copies ask for; empty: the same version the live request went to."""
    pool: str = ""
    """The pool the copies go to; empty: the model's own pools, cheapest first, as live traffic."""
    fraction: float = 1.0
    """Share of live requests copied (0 < fraction <= 1)."""
    max_in_flight: int = 32
    """Copies in flight at most; a copy beyond it is dropped (counted), never queued: the shadow
    never slows or fails a live request."""
    timeout_ms: float = 10_000.0
    """A copy's own deadline (Triton's `timeout`), so a hung shadow frees its slot."""
    output: str = ""
    """The output tensor whose values are compared between live and shadow; empty: the first one."""
    bins: int = 20
    """Bins of the output histograms (quantile edges learned from the first live outputs)."""
    learn_values: int = 2000
    """Live output values that fix the histogram's edges before counting starts."""

    def validate(self, path: str) -> None:
        if not self.version and not self.pool:
            raise ConfigError(path, "expected `version` (a model version) or `pool` (a pool name), or both")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"{path}.fraction", f"expected a share in (0, 1], got {self.fraction}")
        if self.max_in_flight < 1:
            raise ConfigError(f"{path}.max_in_flight", "expected at least 1")
        if self.timeout_ms <= 0:
            raise ConfigError(f"{path}.timeout_ms", "expected a positive number of milliseconds")
        if not 2 <= self.bins <= 1000:
            raise ConfigError(f"{path}.bins", f"expected 2 to 1000 bins, got {self.bins}")
        if self.learn_values < self.bins:
            raise ConfigError(f"{path}.learn_values", f"expected at least `bins` ({self.bins}) values")


def validate_split(split: dict[str, float], path: str) -> None:
    """A split is {version: weight}: non-negative weights, at least one positive, versions named."""
    if not split:
        raise ConfigError(path, "expected at least one version: weight")
    for version, weight in split.items():
        if not version or not version.isdigit():
            raise ConfigError(f"{path}.{version}", f"expected a model version number as the key, got {version!r}")
        if not weight >= 0.0 or weight == float("inf"):
            raise ConfigError(f"{path}.{version}", f"expected a weight >= 0, got {weight}")
    if sum(split.values()) <= 0:
        raise ConfigError(path, "expected at least one positive weight")


@dataclass(frozen=True)
class ModelRoute:
    """The route of one model: its pools in preference order, its objective, its versions' traffic."""

    pools: tuple[str, ...]
    """Pool names, most preferred first; the next is used when a pool has no healthy backend. With
    pool costs (`pools.NAME.cost`), the cheapest comes first and this order breaks ties."""
    sequence_idle_timeout_s: float | None = None
    """A sequence unused this long is forgotten. Default: the model's own
    sequence_batching.max_sequence_idle_microseconds, or 60 s when it has none."""
    latency_slo_ms: float | None = None
    """Latency objective of one request at the backend. Set: each request goes to the cheapest pool
    predicted to meet it (EWMA service time × queue ahead, per backend), spilling to the next when
    the pool would miss it, back when it recovers (routing.slo_spill_ratio / slo_return_ratio).
    Unset: the first pool with a healthy backend, as without an objective."""
    split: dict[str, float] | None = None
    """Traffic split between versions, {version: weight} (weights need not sum to 1). Applies to
    requests that name no version; a request naming a version gets that version. The version with
    the largest weight is the stable one; requests sent to the others count as `canary` decisions."""
    sticky_key: str = STICKY_KEY
    """The gRPC metadata key, or request parameter (string or int), whose value keeps a client on
    one version: a stable hash of it picks the version, so a key always gets the same one while the
    split stays. Without it each request is drawn at random by the weights."""
    shadow: ShadowConfig | None = None
    """A shadow target (another version and/or pool) that gets a copy of live traffic."""
    compare_output: str = ""
    """With a split: the output tensor whose values are histogrammed per version and compared with
    the stable version's (PSI, KS; admin snapshot `traffic.MODEL.outputs`); empty: the first output."""

    def validate(self, path: str) -> None:
        if not self.pools:
            raise ConfigError(f"{path}.pools", "expected at least one pool name")
        if self.sequence_idle_timeout_s is not None and self.sequence_idle_timeout_s <= 0:
            raise ConfigError(f"{path}.sequence_idle_timeout_s", "expected a positive number of seconds")
        if self.latency_slo_ms is not None and not 0 < self.latency_slo_ms < float("inf"):
            raise ConfigError(f"{path}.latency_slo_ms", f"expected a positive number of milliseconds, got {self.latency_slo_ms}")
        if self.split is not None:
            validate_split(self.split, f"{path}.split")
        if not self.sticky_key:
            raise ConfigError(f"{path}.sticky_key", "expected a metadata key / parameter name")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing behaviour common to all models."""

    retry_unavailable: bool = True
    """Resend a request to another backend when its backend could not answer it (UNAVAILABLE),
    while the client's deadline leaves room; see gateway/routing/dispatcher.py for the rule."""
    max_attempts: int = 3
    """Attempts of one request at most, the first included."""
    retry_budget_ratio: float = 0.2
    """Retries may add at most this share of the requests sent (plus `retry_budget_min_per_s`);
    requests failed over from an ejected backend are not charged."""
    retry_budget_min_per_s: float = 10.0
    """Retries per second allowed whatever the traffic (a quiet gateway may still retry)."""

    hedge_after_p95: bool = False
    """Hedged requests (gateway/routing/hedging.py): a request its backend has not answered within
    the model's observed 95th-percentile backend latency is sent to a second backend too, and the
    first answer wins. Charged to the retry budget. Off by default: it costs a task per request."""
    hedge_min_delay_ms: float = 1.0
    """The least wait before a hedge, whatever the p95."""
    ewma_tau_s: float = 0.5
    """Time constant of the EWMA service time per backend: a sample's weight decays as exp(-Δt/tau)."""
    slo_spill_ratio: float = 0.8
    """A pool stops taking a model's traffic when its service time exceeds this share of the
    model's latency_slo_ms, and a request skips a pool whose prediction (with its queue) does."""
    slo_return_ratio: float = 0.5
    """A pool that stopped takes traffic again once its service time is below this share of the
    objective (below slo_spill_ratio: the band between them keeps a pool from flapping)."""
    probe_interval_s: float = 0.5
    """While a pool is out for missing the objective, a copy of one live request goes there this
    often to measure it again (its answer is discarded; the client is served elsewhere)."""
    probe_max_in_flight: int = 4
    """Probe copies in flight at most (a slow pool holds them); more are dropped and counted."""

    def validate(self, path: str) -> None:
        if self.hedge_min_delay_ms < 0:
            raise ConfigError(f"{path}.hedge_min_delay_ms", "expected zero or more milliseconds")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigError(f"{path}.max_attempts", "expected 1 to 10 attempts")
        if not 0 <= self.retry_budget_ratio <= 1:
            raise ConfigError(f"{path}.retry_budget_ratio", "expected a share from 0 to 1")
        if self.retry_budget_min_per_s < 0:
            raise ConfigError(f"{path}.retry_budget_min_per_s", "expected zero or more retries per second")
        if self.ewma_tau_s <= 0:
            raise ConfigError(f"{path}.ewma_tau_s", "expected a positive number of seconds")
        if not 0 < self.slo_spill_ratio:
            raise ConfigError(f"{path}.slo_spill_ratio", "expected a positive share of the objective")
        if not 0 < self.slo_return_ratio < self.slo_spill_ratio:
            raise ConfigError(
                f"{path}.slo_return_ratio",
                f"expected a share above 0 and below slo_spill_ratio ({self.slo_spill_ratio}), got {self.slo_return_ratio}",
            )
        if self.probe_interval_s <= 0:
            raise ConfigError(f"{path}.probe_interval_s", "expected a positive number of seconds")
        if self.probe_max_in_flight < 1:
            raise ConfigError(f"{path}.probe_max_in_flight", "expected at least 1")
