"""`tensorgate drift report --gateway ADDR MODEL [--plot FILE.png] [--save-profile FILE.json]`."""

from __future__ import annotations

import json
import sys
import time

import grpc

from gateway.admin.drift_service import SERVICE, messages

LEVEL_MARK = {"ok": " ", "warning": "!", "alert": "‼"}


def fetch_report(address: str, model: str, timeout: float = 10.0):
    admin_messages = messages()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/GetDriftReport",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=admin_messages["DriftReport"].FromString,
        )
        return call(admin_messages["DriftReportRequest"](model=model), timeout=timeout)


def format_report(report) -> str:
    statistics = ["psi", "js", "ks", "wasserstein", "chi_square"]
    if report.mode == "sequential":
        statistics.append("cusum")
    lines = [
        f"drift report of model '{report.model}': {report.windows_evaluated} windows evaluated, "
        f"{report.window_rows} rows per window, {report.mode or 'threshold'} mode"
        + (f" (level {report.alpha:.3g} an evaluation)" if report.mode in ("calibrated", "sequential") else ""),
        "",
        f"  {'tensor':<20}{'feature':>8}  " + "".join(f"{name:>12}" for name in statistics)
        + f"{'p (ks)':>12}{'shift (σ)':>11}  level",
    ]
    ranked = sorted(report.features, key=lambda f: -f.statistics.get("psi", 0.0))
    for feature in ranked:
        values = "".join(f"{feature.statistics.get(name, float('nan')):>12.4f}" for name in statistics)
        values += f"{feature.p_values.get('ks', float('nan')):>12.3g}{feature.effect_size:>+11.3f}"
        lines.append(f"{LEVEL_MARK.get(feature.level, '?')} {feature.tensor:<20}{feature.feature:>8}  {values}  {feature.level}")
    if not report.features:
        lines.append("  (no full window yet: the reference is being learned or the window is filling)")
    if report.alerts:
        lines.append("")
        lines.append("alerts:")
        for alert in report.alerts:
            why = f", p = {alert.p_value:.3g}" if alert.p_value == alert.p_value else ""
            since = time.strftime("%H:%M:%S", time.localtime(alert.since)) if alert.since == alert.since else "?"
            lines.append(f"  {alert.level:<8} {alert.tensor} feature {alert.feature}: {alert.statistic} = {alert.value:.4f}"
                         f"{why} ({alert.mode or 'threshold'} mode), shift {alert.effect_size:+.3f} σ, since {since}")
    return "\n".join(lines)


def plot_report(report, path: str, most: int = 4):
    """Reference vs current histograms of the most drifted features (by PSI), one panel each, with
    each feature's mean shift in reference SDs; written to `path`, and the figure returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"tensorgate: --plot needs matplotlib: pip install 'tensorgate[plot]' ({error})")
    import numpy as np

    histograms = json.loads(report.histograms_json)
    ranked = sorted(report.features, key=lambda f: -f.statistics.get("psi", 0.0))[:most]
    if not ranked:
        raise SystemExit("tensorgate: nothing to plot yet: no full window has been evaluated")
    figure, axes = plt.subplots(1, len(ranked), figsize=(4.5 * len(ranked), 3.6), squeeze=False)
    for axis, feature in zip(axes[0], ranked):
        data = histograms[feature.tensor]
        column = feature.feature if feature.feature < len(data["edges"]) else 0
        edges = np.array(data["edges"][column])
        bins = len(edges) - 1
        reference = np.array(data["reference"][column][:bins], dtype=float)
        current = np.array(data["current"][column][:bins], dtype=float)
        centers = np.arange(bins)
        axis.bar(centers - 0.2, reference / max(reference.sum(), 1), width=0.4, label="reference")
        axis.bar(centers + 0.2, current / max(current.sum(), 1), width=0.4, label="current window")
        axis.set_title(f"{feature.tensor}[{feature.feature}]  PSI {feature.statistics.get('psi', 0):.3f} ({feature.level})",
                       fontsize=9)
        if feature.effect_size == feature.effect_size:  # NaN for categories: they have no mean
            # How far, in the feature's own units: the mean shift in reference standard deviations.
            axis.text(0.02, 0.96, f"mean shift {feature.effect_size:+.2f} σ", transform=axis.transAxes,
                      va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        axis.set_xticks(centers[:: max(1, bins // 6)])
        axis.set_xticklabels([f"{edges[i]:.2g}" for i in range(0, bins, max(1, bins // 6))])
        axis.set_xlabel("bin (lower edge)")
        axis.set_ylabel("share of rows")
        axis.legend(fontsize=8)
    figure.suptitle(f"drift of model '{report.model}': reference vs current window")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return figure


def cmd_drift_report(args) -> int:
    try:
        report = fetch_report(args.gateway, args.model)
    except grpc.RpcError as error:
        print(f"tensorgate: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.save_profile:
        histograms = json.loads(report.histograms_json)
        with open(args.save_profile, "w", encoding="utf-8") as stream:
            json.dump({k: _profile_entry(v) for k, v in histograms.items()}, stream)
        print(f"\nprofile of the current window saved to {args.save_profile}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


def _profile_entry(histogram: dict) -> dict:
    """A tensor's saved profile: its current window (or reference) on the bins, and on the fine CDF bins."""
    entry = {"edges": histogram["edges"], "reference": histogram["current"] or histogram["reference"]}
    cdf = histogram.get("cdf")
    if cdf is not None:
        current = cdf["current"] is not None
        entry["cdf"] = {"edges": cdf["edges"], "reference": cdf["current"] if current else cdf["reference"],
                        "reference_tails": cdf["current_tails"] if current else cdf["reference_tails"],
                        "reference_outer": cdf["current_outer"] if current else cdf["reference_outer"]}
    return entry
