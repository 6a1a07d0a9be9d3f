"""`tensorgate.admin.v1.DriftService`: drift reports, alerts and references over gRPC."""

from __future__ import annotations

import json
import math
from typing import Callable

from gateway.drift.stage import DriftStage
from gateway.errors import InvalidArgument, NotFound, shown
from gateway.protocol import message_class
from gateway.server.rpc import Call, Method, methods_of, parse_request

SERVICE = "tensorgate.admin.v1.DriftService"


def messages() -> dict[str, type]:
    """The admin service's message classes by short name."""
    names = ["DriftReportRequest", "DriftReport", "ListAlertsRequest", "ListAlertsResponse", "SetReferenceRequest",
             "ResetReferenceRequest", "SetReferenceResponse", "DriftAlert"]
    return {name: message_class(f"tensorgate.admin.v1.{name}") for name in names}


class DriftService:
    def __init__(self, drift: DriftStage) -> None:
        self.drift = drift
        self.m = messages()

    def __repr__(self) -> str:
        return f"<DriftService {self.drift!r}>"

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {
            "GetDriftReport": self._raw(self.get_report, "DriftReportRequest"),
            "ListAlerts": self._raw(self.list_alerts, "ListAlertsRequest"),
            "SetReference": self._raw(self.set_reference, "SetReferenceRequest"),
            "ResetReference": self._raw(self.reset_reference, "ResetReferenceRequest"),
        })

    def _raw(self, handler: Callable, request_type: str) -> Callable:
        """A raw-bytes handler around one that takes and returns messages."""
        message_type = self.m[request_type]

        async def serve(raw: bytes, call: Call) -> bytes:
            return handler(parse_request(message_type, raw)).SerializeToString()

        serve.__name__ = handler.__name__
        return serve

    def _monitor(self, model: str):
        self.drift.flush()  # what the gateway answered so far, counted: a report then holds all of it
        monitor = self.drift.monitors.get(model)
        if monitor is None:
            watched = ", ".join(sorted(self.drift.monitors)) or "none"
            raise NotFound(f"model '{shown(model)}' is not drift-monitored; monitored models: {watched}")
        return monitor

    def _alert(self, alert: dict):
        return self.m["DriftAlert"](
            model=alert["model"], tensor=alert["tensor"], feature=int(alert["feature"]), statistic=alert["statistic"],
            value=float(alert["value"]), level=alert["level"], time=float(alert["time"]),
            mode=alert.get("mode", "threshold"), p_value=float(alert.get("p_value", math.nan)),
            alpha=float(alert.get("alpha", math.nan)), effect_size=float(alert.get("effect_size", math.nan)),
            since=float(alert.get("since") or math.nan),
        )

    def get_report(self, request):
        self._monitor(request.model)
        report = self.drift.report(request.model)
        response = self.m["DriftReport"](
            model=request.model, window_rows=int(report.get("window_rows", 0)),
            windows_evaluated=int(report.get("windows_evaluated", 0)),
            histograms_json=json.dumps(report["histograms"]), mode=report.get("mode") or self._monitor(request.model).config.mode,
            alpha=float(report.get("alpha") or math.nan),
        )
        for feature in report["features"]:
            item = response.features.add(tensor=feature["tensor"], feature=int(feature["feature"]), level=feature["level"],
                                         effect_size=float(feature.get("effect_size", math.nan)),
                                         since=float(feature.get("since") or math.nan))
            for name, value in feature["statistics"].items():
                item.statistics[name] = float(value)
            for name, value in feature.get("p_values", {}).items():
                item.p_values[name] = float(value)
        response.alerts.extend(self._alert(a) for a in report["alerts"])
        return response

    def list_alerts(self, request):
        if request.model:
            self._monitor(request.model)
        alerts = self.drift.alerts(request.model or None)
        return self.m["ListAlertsResponse"](alerts=[self._alert(a) for a in alerts])

    def set_reference(self, request):
        monitor = self._monitor(request.model)
        source = request.WhichOneof("source")
        if source == "from_current_window":
            changed = monitor.reference_from_current_window()
            if not changed:
                raise InvalidArgument(f"model '{request.model}' has no full window yet to take as its reference")
            return self.m["SetReferenceResponse"](message=f"reference of {changed} tensor(s) set from the current window")
        if source == "profile_json":
            try:
                changed = monitor.load_profile(json.loads(request.profile_json))
            except (ValueError, KeyError, TypeError) as error:
                raise InvalidArgument(
                    f"profile_json is not a drift profile ({error}); expected "
                    '{"input/NAME": {"edges": [[...]], "reference": [[...]]}}'
                ) from None
            return self.m["SetReferenceResponse"](message=f"reference of {changed} tensor(s) set from the profile")
        raise InvalidArgument("expected from_current_window or profile_json")

    def reset_reference(self, request):
        monitor = self._monitor(request.model)
        monitor.forget_references()
        return self.m["SetReferenceResponse"](
            message=f"reference forgotten; learning it from the next {monitor.config.reference.learn_rows} rows"
        )
