"""Config of the drift stage: which tensors of which models are watched, against what, and when to alert."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ConfigError

STATISTICS = ("psi", "js", "ks", "wasserstein", "chi_square")
REDUCTIONS = ("none", "mean", "l2")
MODES = ("threshold", "calibrated", "sequential")


@dataclass(frozen=True)
class ReferenceConfig:
    """Where a model's reference distribution comes from (the first that is set wins)."""

    file: str | None = None
    """Training data: `.npy` (one tensor) or `.npz` (one array per tensor name), rows first."""
    profile: str | None = None
    """A saved profile (JSON: bin edges and counts per tensor), e.g. from `drift report --save-profile`."""
    learn_rows: int = 5000
    """Without file or profile: learn the reference from the first rows seen after start."""

    def validate(self, path: str) -> None:
        if self.learn_rows < 1:
            raise ConfigError(f"{path}.learn_rows", "expected at least 1 row")


@dataclass(frozen=True)
class ModelDriftConfig:
    """Drift monitoring of one model."""

    inputs: tuple[str, ...] = ()
    """Input tensors to watch; with `outputs` also empty, every input is watched."""
    outputs: tuple[str, ...] = ()
    """Output tensors to watch."""
    features: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per tensor, the columns to watch (default: every column of a [batch, F] tensor)."""
    reduction: dict[str, str] = field(default_factory=dict)
    """Per tensor, a reduction for wide tensors: none, mean or l2 — per row and channel over the
    trailing dimensions of a [rows, C, ...] tensor (one feature per channel of an image), or per
    row of a [rows, D] tensor (one feature per embedding)."""
    bins: int = 16
    """Bins per feature for PSI, JS and chi²; edges come from reference quantiles, so every bin starts with mass."""
    cdf_refine: int = 16
    """KS and Wasserstein-1 are computed on bins × cdf_refine quantile bins (the bins above are runs of
    cdf_refine of them), with the sums of the outer bins' values for W1's tails: one histogram update
    a request either way."""
    buckets: int = 64
    """Hashed frequency buckets per feature of a BYTES (categorical) tensor."""
    window_rows: int = 5000
    """Rows in one window."""
    sub_windows: int = 5
    """The window slides by window_rows / sub_windows rows: it is evaluated that often."""
    window_seconds: float | None = None
    """Also close a sub-window after this long (windows by time, for quiet models)."""
    sample_rate: float = 1.0
    """Fraction of requests whose tensors are counted (for heavy traffic): exactly that share,
    evenly spread (0.3: 3 requests of every 10)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    thresholds: dict[str, tuple[float, float]] = field(default_factory=lambda: {"psi": (0.1, 0.25)})
    """Per statistic (psi, js, ks, wasserstein, chi_square): (warning, alert) thresholds."""
    mode: str = "threshold"
    """threshold: alert on `thresholds` after `consecutive` windows. calibrated: a test per feature
    (KS on the fine bins against this reference, allowing for the reference's own sampling error;
    chi² of homogeneity for BYTES buckets) at a level set by `false_alarms_per_windows`, with Holm's
    correction across every test of the model: an alert fires on the first window that rejects.
    sequential: the calibrated tests with half of the budget, and with the other half a CUSUM per
    numeric feature that adds up evidence of a shift sub-window after sub-window (sequential.py), so
    a shift too small for any one window is caught after a few."""
    false_alarms_per_windows: float = 1000.0
    """calibrated and sequential: at most one false alert per this many windows of window_rows rows, per model (the
    level of each evaluation is 1 / (this × sub_windows): a window is evaluated sub_windows times)."""
    consecutive: int = 2
    """Windows in a row above a threshold before the alert fires (threshold mode)."""
    clear_after: int = 2
    """Windows in a row below the warning threshold before a fired alert clears (hysteresis)."""

    def validate(self, path: str) -> None:
        for tensor, how in self.reduction.items():
            if how not in REDUCTIONS:
                raise ConfigError(f"{path}.reduction.{tensor}", f"expected one of {', '.join(REDUCTIONS)}, got {how!r}")
        if self.buckets < 2:
            raise ConfigError(f"{path}.buckets", "expected at least 2 buckets")
        if self.bins < 2:
            raise ConfigError(f"{path}.bins", "expected at least 2 bins")
        if self.cdf_refine < 1 or self.bins * self.cdf_refine > 65536:
            raise ConfigError(f"{path}.cdf_refine", "expected at least 1, with bins × cdf_refine <= 65536")
        if self.mode not in MODES:
            raise ConfigError(f"{path}.mode", f"expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.false_alarms_per_windows >= 1:
            raise ConfigError(f"{path}.false_alarms_per_windows", "expected at least 1 (one false alert per N windows)")
        if self.sub_windows < 1 or self.window_rows < self.sub_windows:
            raise ConfigError(f"{path}.sub_windows", "expected 1 to window_rows sub-windows")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"{path}.sample_rate", "expected a fraction in (0, 1]")
        for name, pair in self.thresholds.items():
            if name not in STATISTICS:
                raise ConfigError(f"{path}.thresholds.{name}", f"unknown statistic; expected one of {', '.join(STATISTICS)}")
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise ConfigError(f"{path}.thresholds.{name}", "expected [warning, alert] with 0 <= warning <= alert")
        if self.consecutive < 1 or self.clear_after < 1:
            raise ConfigError(f"{path}.consecutive", "expected at least 1 window")


@dataclass(frozen=True)
class DriftConfig:
    """`drift:` — the monitored models and where alerts go."""

    models: dict[str, ModelDriftConfig] = field(default_factory=dict)
    webhook: str | None = None
    """POST each alert as JSON here (retried with backoff, off the request path)."""
    capture_dir: str | None = None
    """Write each alert's evidence here: the drift report (JSON) and a reservoir sample (.npz)."""
    reservoir_rows: int = 1000
    """Rows of recent inputs and outputs kept per model for the capture."""

    def validate(self, path: str) -> None:
        if self.reservoir_rows < 1:
            raise ConfigError(f"{path}.reservoir_rows", "expected at least 1 row")
