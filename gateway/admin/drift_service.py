"""`tensorgate.admin.v1.DriftService`: drift reports, alerts and references over gRPC."""

from __future__ import annotations

import json

import grpc
import numpy as np

from gateway.drift.stage import DriftStage
from gateway.errors import GatewayError, InvalidArgument, NotFound
from gateway.protocol import message_class

SERVICE = "tensorgate.admin.v1.DriftService"


def _messages() -> dict[str, type]:
    names = ["DriftReportRequest", "DriftReport", "ListAlertsRequest", "ListAlertsResponse", "SetReferenceRequest",
             "ResetReferenceRequest", "SetReferenceResponse", "DriftAlert"]
    return {name: message_class(f"tensorgate.admin.v1.{name}") for name in names}


class DriftService:
    def __init__(self, drift: DriftStage) -> None:
        self.drift = drift
        self.m = _messages()

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "GetDriftReport": (self.get_report, "DriftReportRequest"),
            "ListAlerts": (self.list_alerts, "ListAlertsRequest"),
            "SetReference": (self.set_reference, "SetReferenceRequest"),
            "ResetReference": (self.reset_reference, "ResetReferenceRequest"),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._translated(fn),
                request_deserializer=self.m[request_type].FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, (fn, request_type) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    @staticmethod
    def _translated(fn):
        async def call(request, context):
            try:
                return fn(request)
            except GatewayError as error:
                await context.abort(error.code, error.message)

        return call

    def _monitor(self, model: str):
        monitor = self.drift.monitors.get(model)
        if monitor is None:
            watched = ", ".join(sorted(self.drift.monitors)) or "none"
            raise NotFound(f"model '{model}' is not drift-monitored; monitored models: {watched}")
        return monitor

    def _alert(self, alert: dict):
        return self.m["DriftAlert"](
            model=alert["model"], tensor=alert["tensor"], feature=int(alert["feature"]), statistic=alert["statistic"],
            value=float(alert["value"]), level=alert["level"], time=float(alert["time"]),
        )

    def get_report(self, request):
        self._monitor(request.model)
        report = self.drift.report(request.model)
        response = self.m["DriftReport"](
            model=request.model, window_rows=int(report.get("window_rows", 0)),
            windows_evaluated=int(report.get("windows_evaluated", 0)),
            histograms_json=json.dumps(report["histograms"]),
        )
        for feature in report["features"]:
            item = response.features.add(tensor=feature["tensor"], feature=int(feature["feature"]), level=feature["level"])
            for name, value in feature["statistics"].items():
                item.statistics[name] = float(value)
        response.alerts.extend(self._alert(a) for a in report["alerts"])
        return response

    def list_alerts(self, request):
        if request.model:
            self._monitor(request.model)
        alerts = [a for a in self.drift.alerts if not request.model or a["model"] == request.model]
        return self.m["ListAlertsResponse"](alerts=[self._alert(a) for a in alerts])

    def set_reference(self, request):
        monitor = self._monitor(request.model)
        source = request.WhichOneof("source")
        if source == "from_current_window":
            changed = 0
            for tensor in monitor.tensors.values():
                if tensor.reference is not None and tensor._ring:
                    tensor.set_reference_counts(tensor.edges, tensor.window())
                    changed += 1
            if not changed:
                raise InvalidArgument(f"model '{request.model}' has no full window yet to take as its reference")
            return self.m["SetReferenceResponse"](message=f"reference of {changed} tensor(s) set from the current window")
        if source == "profile_json":
            try:
                profile = json.loads(request.profile_json)
                for key, entry in profile.items():
                    kind, _, name = key.partition("/")
                    monitor._monitor(name, kind).set_reference_counts(np.array(entry["edges"]), np.array(entry["reference"]))
            except (ValueError, KeyError, TypeError) as error:
                raise InvalidArgument(
                    f"profile_json is not a drift profile ({error}); expected "
                    '{"input/NAME": {"edges": [[...]], "reference": [[...]]}}'
                ) from None
            return self.m["SetReferenceResponse"](message=f"reference of {len(profile)} tensor(s) set from the profile")
        raise InvalidArgument("expected from_current_window or profile_json")

    def reset_reference(self, request):
        monitor = self._monitor(request.model)
        for tensor in monitor.tensors.values():
            tensor.forget_reference()
        return self.m["SetReferenceResponse"](
            message=f"reference forgotten; learning it from the next {monitor.config.reference.learn_rows} rows"
        )
