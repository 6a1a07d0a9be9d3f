"""Calibrated drift alerts: a false-alarm budget instead of a PSI number. Quiet windows through the
monitor in-process (1,000 of them), shifts of one feature in 16, and the same through the real
gateway and its admin API."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import numpy as np
import pytest
from scipy import stats

from gateway.drift.config import ModelDriftConfig, ReferenceConfig
from gateway.drift.monitor import ModelMonitor
from gateway.protocol import pb
from gateway.testing import GatewayThread

FEATURES, WINDOW, SUB_WINDOWS, REFERENCE_ROWS = 16, 5000, 5, 20_000


def _request(block: np.ndarray, model: str = "m"):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="X" if model == "m" else "INPUT0", datatype="FP32", shape=list(block.shape))
    request.raw_input_contents.append(block.astype(np.float32).tobytes())
    return request


def _monitor(fired: list, **overrides) -> ModelMonitor:
    config = ModelDriftConfig(mode="calibrated", window_rows=WINDOW, sub_windows=SUB_WINDOWS,
                              reference=ReferenceConfig(learn_rows=REFERENCE_ROWS), **overrides)
    return ModelMonitor("m", config, fired.append, reservoir_rows=10)


def test_a_thousand_quiet_windows_raise_at_most_one_false_alert():
    """1,000 windows of 5,000 rows × 16 features from the reference distribution, each evaluated 5
    times as the window slides: at most one alert (the budget: one per 1,000 windows). A looser view
    of the same stream checks the calibration itself: the share of evaluations whose smallest
    Holm-adjusted p-value is <= 0.1 (an alert at a 500× larger budget) is at most 0.1."""
    fired: list[dict] = []
    monitor = _monitor(fired)
    rng = np.random.default_rng(2026)
    monitor.observe(_request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    adjusted: list[float] = []
    for _ in range(1000 * SUB_WINDOWS):
        monitor.observe(_request(rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))), None)
        if monitor.last_report is not None and monitor.last_report["windows_evaluated"] > len(adjusted):
            p_values = [p for feature in monitor.last_report["features"] for p in feature["p_values"].values()]
            adjusted.append(min(p_values) * len(p_values))
    assert monitor.windows_evaluated == 1000 * SUB_WINDOWS - SUB_WINDOWS + 1  # from the first full window on
    raised = [alert for alert in fired if alert["level"] != "ok"]
    assert len(raised) <= 1, raised
    assert np.mean(np.array(adjusted) <= 0.1) <= 0.1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("shift", "within_windows"), [(0.5, 1), (0.25, 4)])
def test_a_shift_of_one_feature_in_sixteen_alerts_in_time(seed, shift, within_windows):
    """After a quiet window, feature 3 moves by `shift` reference SDs: the alert names feature 3 (and
    only it) before `within_windows` windows of shifted rows have passed."""
    fired: list[dict] = []
    monitor = _monitor(fired)
    rng = np.random.default_rng(seed)
    monitor.observe(_request(rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    for _ in range(SUB_WINDOWS):
        monitor.observe(_request(rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))), None)
    assert fired == []
    for sub_window in range(1, within_windows * SUB_WINDOWS + 1):
        block = rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))
        block[:, 3] += shift
        monitor.observe(_request(block), None)
        if fired:
            break
    raised = [alert for alert in fired if alert["level"] != "ok"]
    assert raised, f"no alert after {within_windows} windows of a {shift}σ shift"
    assert {alert["feature"] for alert in raised} == {3}
    alert = raised[0]
    assert alert["mode"] == "calibrated" and alert["statistic"] == "ks"
    assert alert["p_value"] * alert["tests"] <= alert["alpha"]
    assert alert["effect_size"] == pytest.approx(shift * min(1.0, sub_window / SUB_WINDOWS), abs=0.08)


def test_threshold_mode_says_so():
    fired: list[dict] = []
    monitor = ModelMonitor("m", ModelDriftConfig(window_rows=1000, sub_windows=1, consecutive=1,
                                                 reference=ReferenceConfig(learn_rows=1000)), fired.append, 10)
    rng = np.random.default_rng(1)
    monitor.observe(_request(rng.standard_normal((1000, 2))), None)
    monitor.observe(_request(rng.standard_normal((1000, 2)) + 2.0), None)
    assert fired and {(a["mode"], a["statistic"]) for a in fired} == {("threshold", "psi")}
    assert monitor.last_report["mode"] == "threshold"


# ------------------------------------------------------------------------------ through the gateway

def _send(address: str, blocks: list[np.ndarray]) -> None:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for start in range(0, len(blocks), 8):
                await asyncio.gather(*(call(_request(b, "simple_scale").SerializeToString(), timeout=10)
                                       for b in blocks[start:start + 8]))

    asyncio.run(run())


def _admin(address: str, method: str, request_type: str, response_type: str, **fields):
    from gateway.admin.drift_service import SERVICE, messages

    classes = messages()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=classes[response_type].FromString)
        return call(classes[request_type](**fields), timeout=10)


def test_calibrated_alert_through_the_gateway(tritons, tmp_path):
    """Real traffic through the gateway to a real Triton: a 0.5σ shift of feature 3 of 16 alerts
    within one window (5,120 rows, 5 sub-windows of 16 requests of 64 rows), in calibrated mode, and
    the admin API reports the mode, the level, the p-value, the effect size and since when; the
    report's KS and W1 agree with SciPy on exactly the rows of the window."""
    rows, window = 64, 5120
    reference = np.random.default_rng(1).standard_normal((REFERENCE_ROWS, FEATURES)).astype(np.float32)
    np.save(tmp_path / "training.npy", reference)
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "drift": {"models": {"simple_scale": {
            "inputs": ["INPUT0"], "window_rows": window, "sub_windows": SUB_WINDOWS, "mode": "calibrated",
            "false_alarms_per_windows": 1000, "reference": {"file": str(tmp_path / "training.npy")}}}},
    }
    rng = np.random.default_rng(2)
    quiet = [rng.standard_normal((rows, FEATURES)).astype(np.float32) for _ in range(window // rows)]
    shifted = [rng.standard_normal((rows, FEATURES)).astype(np.float32) for _ in range(window // rows)]
    for block in shifted:
        block[:, 3] += 0.5
    with GatewayThread(config) as gateway:
        started = time.time()
        _send(gateway.address, quiet)
        assert gateway.call(lambda: gateway.gateway.drift.alerts()) == []
        _send(gateway.address, shifted)
        report = _admin(gateway.address, "GetDriftReport", "DriftReportRequest", "DriftReport", model="simple_scale")
        listed = _admin(gateway.address, "ListAlerts", "ListAlertsRequest", "ListAlertsResponse", model="simple_scale")
        assert not gateway.loop_errors
    raised = [alert for alert in listed.alerts if alert.level != "ok"]
    assert raised and {alert.feature for alert in raised} == {3}
    alert = raised[0]
    assert alert.mode == "calibrated" and alert.statistic == "ks"
    assert alert.p_value <= alert.alpha == pytest.approx(1 / (1000 * SUB_WINDOWS))
    assert 0.0 < alert.effect_size <= 0.6 and started <= alert.since <= alert.time
    assert report.mode == "calibrated" and report.alpha == pytest.approx(1 / (1000 * SUB_WINDOWS))
    by_feature = {feature.feature: feature for feature in report.features}
    assert by_feature[3].level == "alert" and {f.level for i, f in by_feature.items() if i != 3} == {"ok"}
    assert by_feature[3].effect_size == pytest.approx(0.5, abs=0.06)
    assert by_feature[3].p_values["ks"] < 1e-20
    window_rows = np.concatenate(shifted).astype(np.float64)  # the window is exactly the shifted rows
    for feature in (0, 3):
        exact_ks = stats.ks_2samp(reference[:, feature], window_rows[:, feature]).statistic
        exact_w1 = stats.wasserstein_distance(reference[:, feature].astype(np.float64), window_rows[:, feature])
        got = by_feature[feature].statistics
        noise_ks = stats.ks_2samp(reference[:5000, feature], reference[5000:, feature]).statistic
        noise_w1 = stats.wasserstein_distance(reference[:5000, feature], reference[5000:, feature])
        assert abs(got["ks"] - exact_ks) <= max(0.01 * exact_ks, 0.35 * noise_ks), (feature, got["ks"], exact_ks)
        assert abs(got["wasserstein"] - exact_w1) <= max(0.01 * exact_w1, 0.35 * noise_w1), (feature, got["wasserstein"], exact_w1)
    assert math.isclose(by_feature[3].statistics["ks"], stats.ks_2samp(reference[:, 3], window_rows[:, 3]).statistic, rel_tol=0.01)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 1.0), (10.0, 3.0), (-500.0, 0.01)])
def test_effect_size_is_the_mean_shift_in_reference_sds_whatever_the_units(mean, scale):
    """A feature of mean `mean` and SD `scale` moved by 0.5 SD reports +0.5 (and an unmoved one 0),
    within the noise of 5,000 rows' mean (±0.014 SD) and the binning."""
    fired: list[dict] = []
    monitor = _monitor(fired)
    rng = np.random.default_rng(4)
    monitor.observe(_request(mean + scale * rng.standard_normal((REFERENCE_ROWS, FEATURES))), None)
    for _ in range(SUB_WINDOWS):
        block = mean + scale * rng.standard_normal((WINDOW // SUB_WINDOWS, FEATURES))
        block[:, 3] += 0.5 * scale
        monitor.observe(_request(block), None)
    effects = {f["feature"]: f["effect_size"] for f in monitor.last_report["features"]}
    assert effects[3] == pytest.approx(0.5, abs=0.05)
    assert max(abs(effects[f]) for f in effects if f != 3) < 0.06
