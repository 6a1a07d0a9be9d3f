"""Sequential drift mode: a CUSUM of rank scores across sub-windows beside the calibrated window tests.

In-process on the monitor (quiet streams of several distributions, small shifts the window tests
cannot see), then through the real gateway and its admin API."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.admin.drift_cli import plot_report
from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import REFERENCE_BAND, ModelMonitor
from gateway.drift.sequential import Cusum, reference_allowance, sub_window_scores, threshold_for
from gateway.ext import drift as kernels
from gateway.testing import GatewayThread
from tests.test_drift_calibrated import _admin, _request, _send

FEATURES, WINDOW, SUB_WINDOWS, REFERENCE_ROWS = 16, 5000, 5, 20_000
SUB_WINDOW_ROWS = WINDOW // SUB_WINDOWS

DRAWS = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "student_t2": lambda rng, shape: rng.standard_t(2, shape),  # infinite variance: no mean test would hold
    "lognormal": lambda rng, shape: rng.lognormal(0.0, 1.0, shape),
    "discrete": lambda rng, shape: rng.integers(0, 4, shape).astype(np.float64),  # ties in every bin
}


def _monitor(fired: list, mode: str = "sequential") -> ModelMonitor:
    config = ModelDriftConfig(mode=mode, window_rows=WINDOW, sub_windows=SUB_WINDOWS,
                              reference=ReferenceConfig(learn_rows=REFERENCE_ROWS))
    return ModelMonitor("m", config, fired.append, reservoir_rows=10)


@pytest.mark.parametrize("run_length", [100, 1000])
def test_the_threshold_gives_the_average_run_length_it_was_asked_for(run_length):
    """h from Siegmund's approximation, checked by simulating 20,000 one-sided CUSUMs of N(−0.5, 1)
    increments: their mean run length to h is the one asked for within 5 % (the simulation's own
    error is ~0.7 %)."""
    h = threshold_for(run_length)
    rng = np.random.default_rng(run_length)
    sums, steps, alive, step = np.zeros(20_000), np.zeros(20_000), np.ones(20_000, bool), 0
    while alive.any():
        step += 1
        sums[alive] = np.maximum(0.0, sums[alive] + rng.standard_normal(alive.sum()) - 0.5)
        crossed = alive & (sums > h)
        steps[crossed] = step
        alive &= ~crossed
    assert steps.mean() == pytest.approx(run_length, rel=0.05)


@pytest.mark.parametrize("distribution", sorted(DRAWS))
def test_rank_scores_are_standard_normal_whatever_the_distribution(distribution):
    """Sub-windows drawn from the reference's distribution score z with spread 1 (±10 %) whatever its
    shape, heavy tails and ties included; their common offset (the reference's own sampling error)
    stays inside the allowance the CUSUM subtracts."""
    rng = np.random.default_rng(5)
    draw = DRAWS[distribution]
    reference = draw(rng, (REFERENCE_ROWS, 4))
    edges = kernels.quantile_edges(reference, 256)
    index = kernels.cell_index(edges)
    reference_counts = kernels.update_cdf(kernels.new_histogram(edges), np.zeros((4, 2)), np.zeros((4, 0)), edges,
                                          *index, reference)
    cusum = Cusum(reference_counts, REFERENCE_BAND)
    scores = []
    for _ in range(400):
        counts = kernels.update_cdf(kernels.new_histogram(edges), np.zeros((4, 2)), np.zeros((4, 0)), edges, *index,
                                    draw(rng, (SUB_WINDOW_ROWS, 4)))
        z, rows = sub_window_scores(counts, cusum.scores, cusum.mean, cusum.variance)
        assert (rows == SUB_WINDOW_ROWS).all()
        scores.append(z)
    scores = np.array(scores)
    assert np.all(np.abs(scores.std(axis=0) - 1.0) < 0.1), scores.std(axis=0)
    assert np.all(np.abs(scores.mean(axis=0)) < reference_allowance(SUB_WINDOW_ROWS, REFERENCE_ROWS, REFERENCE_BAND))


@pytest.mark.parametrize(("distribution", "windows"), [("normal", 1000), ("student_t2", 300), ("discrete", 300)])
def test_quiet_windows_stay_within_the_false_alarm_budget(distribution, windows):
    """`windows` quiet windows of 5,000 rows × 16 features, evaluated after every sub-window: at most
    one alert in 1,000 windows (the budget: false_alarms_per_windows = 1,000, half of it the
    CUSUM's); for the shorter runs none. The CUSUM never passes its threshold."""
    fired: list[dict] = []
    monitor = _monitor(fired)
    rng = np.random.default_rng(2027)
    draw = DRAWS[distribution]
    monitor.observe(_request(draw(rng, (REFERENCE_ROWS, FEATURES))), None)
    highest = 0.0
    for _ in range(windows * SUB_WINDOWS):
        monitor.observe(_request(draw(rng, (SUB_WINDOW_ROWS, FEATURES))), None)
        if monitor.last_report is not None:
            highest = max(highest, max(f["statistics"]["cusum"] for f in monitor.last_report["features"]))
    threshold = monitor.last_report["cusum_threshold"]
    assert threshold == pytest.approx(threshold_for(4 * FEATURES * SUB_WINDOWS * 1000))
    raised = [alert for alert in fired if alert["level"] != "ok"]
    assert len(raised) <= (1 if windows >= 1000 else 0), raised
    assert highest < threshold, (highest, threshold)


def _sub_windows_to_alert(mode: str, shift: float, seed: int, windows: int) -> tuple[int | None, list[dict]]:
    """Sub-windows of a `shift`σ move of feature 3 (after one quiet window) until an alert, or None."""
    fired: list[dict] = []
    monitor = _monitor(fired, mode)
    rng = np.random.default_rng(seed)
    monitor.observe(_request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    for _ in range(SUB_WINDOWS):
        monitor.observe(_request(rng.standard_normal((SUB_WINDOW_ROWS, FEATURES))), None)
    assert fired == []
    for sub_window in range(1, windows * SUB_WINDOWS + 1):
        block = rng.standard_normal((SUB_WINDOW_ROWS, FEATURES))
        block[:, 3] += shift
        monitor.observe(_request(block), None)
        raised = [alert for alert in fired if alert["level"] != "ok"]
        if raised:
            return sub_window, raised
    return None, []


@pytest.mark.parametrize("seed", range(3))
def test_a_shift_too_small_for_any_window_is_caught_by_accumulated_evidence(seed):
    """0.05σ on one feature of 16: the calibrated window tests see nothing in 8 windows (40,000
    shifted rows); the sequential mode alerts on feature 3 by its CUSUM within 8 windows."""
    calibrated, _ = _sub_windows_to_alert("calibrated", 0.05, seed, windows=8)
    sequential, raised = _sub_windows_to_alert("sequential", 0.05, seed, windows=8)
    assert calibrated is None
    assert sequential is not None, "the sequential mode missed a 0.05σ shift over 8 windows"
    assert {alert["feature"] for alert in raised} == {3}
    assert raised[0]["mode"] == "sequential" and raised[0]["statistic"] == "cusum"
    assert raised[0]["value"] > raised[0]["cusum_threshold"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("shift", "within_sub_windows"), [(0.5, 1), (0.25, 3), (0.1, 10)])
def test_clear_shifts_are_caught_within_a_window(seed, shift, within_sub_windows):
    """The sequential mode keeps the calibrated mode's speed on clear shifts (0.5σ within the first
    sub-window of 1,000 rows) and catches 0.1σ within two windows."""
    sequential, raised = _sub_windows_to_alert("sequential", shift, seed, windows=4)
    assert sequential is not None and sequential <= within_sub_windows, sequential
    assert {alert["feature"] for alert in raised} == {3}


def test_the_alert_clears_soon_after_the_shift_ends():
    """Two windows of a 0.5σ shift, then the reference's distribution again: the alert clears within
    three windows (the CUSUM is capped at 1.5 h, so it does not take as long as the shift lasted),
    and the clearing is reported."""
    fired: list[dict] = []
    monitor = _monitor(fired)
    rng = np.random.default_rng(9)
    monitor.observe(_request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    for sub_window in range(SUB_WINDOWS + 2 * SUB_WINDOWS):
        block = rng.standard_normal((SUB_WINDOW_ROWS, FEATURES))
        if sub_window >= SUB_WINDOWS:
            block[:, 3] += 0.5
        monitor.observe(_request(block), None)
    assert [alert["level"] for alert in fired] == ["alert"]
    for _ in range(3 * SUB_WINDOWS):
        monitor.observe(_request(rng.standard_normal((SUB_WINDOW_ROWS, FEATURES))), None)
        if len(fired) > 1:
            break
    assert [alert["level"] for alert in fired] == ["alert", "ok"]


def test_sequential_alert_through_the_gateway(tritons, tmp_path):
    """Real traffic through the gateway to a real Triton in sequential mode: a 0.1σ shift of feature
    3 of 16 alerts by its CUSUM, and the admin API reports the mode, the CUSUM of every feature (the
    shifted one above the threshold, the others below) and the effect size."""
    rows, window = 64, 5120
    reference = np.random.default_rng(1).standard_normal((REFERENCE_ROWS, FEATURES)).astype(np.float32)
    np.save(tmp_path / "training.npy", reference)
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"models": {"simple_scale": {
            "inputs": ["INPUT0"], "window_rows": window, "sub_windows": SUB_WINDOWS, "mode": "sequential",
            "reference": {"file": str(tmp_path / "training.npy")}}}},
    }
    rng = np.random.default_rng(3)
    quiet = [rng.standard_normal((rows, FEATURES)).astype(np.float32) for _ in range(window // rows)]
    shifted = [rng.standard_normal((rows, FEATURES)).astype(np.float32) for _ in range(3 * window // rows)]
    for block in shifted:
        block[:, 3] += 0.1
    with GatewayThread(config) as gateway:
        _send(gateway.address, quiet)
        assert gateway.call(lambda: gateway.gateway.drift.alerts()) == []
        _send(gateway.address, shifted)
        report = _admin(gateway.address, "GetDriftReport", "DriftReportRequest", "DriftReport", model="simple_scale")
        listed = _admin(gateway.address, "ListAlerts", "ListAlertsRequest", "ListAlertsResponse", model="simple_scale")
        assert not gateway.loop_errors
    raised = [alert for alert in listed.alerts if alert.level != "ok"]
    assert raised and {alert.feature for alert in raised} == {3}
    assert raised[0].mode == "sequential" and raised[0].statistic == "cusum"
    assert report.mode == "sequential"
    threshold = threshold_for(4 * FEATURES * SUB_WINDOWS * 1000)
    by_feature = {feature.feature: feature for feature in report.features}
    assert by_feature[3].statistics["cusum"] > threshold
    assert max(f.statistics["cusum"] for i, f in by_feature.items() if i != 3) < threshold
    assert by_feature[3].effect_size == pytest.approx(0.1, abs=0.05)
    # The plot names how far each feature moved, in the feature's reference SDs.
    figure = plot_report(report, str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 10_000
    shown = {axis.get_title(): [text.get_text() for text in axis.texts] for axis in figure.axes}
    assert any(f"[3]" in title and texts == [f"mean shift {by_feature[3].effect_size:+.2f} σ"]
               for title, texts in shown.items()), shown
