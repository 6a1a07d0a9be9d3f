"""`tensorgate.admin.v1.GatewayService`: the gateway's live state over gRPC, on any engine, and the
traffic of a model's versions (SetTraffic: split and shadow, what `tensorgate rollout` drives), and
config reload (ReloadConfig)."""

from __future__ import annotations

import inspect
import json
from typing import Awaitable, Callable

from gateway.configfile import load_dataclass
from gateway.errors import ConfigError, InvalidArgument, Unimplemented
from gateway.protocol import message_class
from gateway.routing.config import ShadowConfig
from gateway.server.rpc import Call, Method, methods_of, parse_request
from gateway.traffic.stage import TrafficStage

SERVICE = "tensorgate.admin.v1.GatewayService"
SnapshotRequest = message_class("tensorgate.admin.v1.SnapshotRequest")
Snapshot = message_class("tensorgate.admin.v1.Snapshot")
SetTrafficRequest = message_class("tensorgate.admin.v1.SetTrafficRequest")
ReloadConfigRequest = message_class("tensorgate.admin.v1.ReloadConfigRequest")
ReloadConfigResponse = message_class("tensorgate.admin.v1.ReloadConfigResponse")


class GatewayService:
    """Answers GetSnapshot with `snapshot()` (Gateway.snapshot, or an awaitable of it) as JSON;
    SetTraffic through `traffic` (the stage, or a function returning the current one: a reload
    replaces it); ReloadConfig with `reload(config_text)` (Gateway.reload_text: "" re-reads the
    config file; raises ConfigError for a config the loader refuses, the client's INVALID_ARGUMENT)."""

    def __init__(self, snapshot: Callable[[], object], traffic: TrafficStage | Callable[[], TrafficStage] | None = None,
                 reload: Callable[[str], Awaitable[str]] | None = None) -> None:
        self._snapshot = snapshot
        self._traffic = traffic
        self._reload = reload

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {"GetSnapshot": self.get_snapshot, "SetTraffic": self.set_traffic,
                                    "ReloadConfig": self.reload_config})

    async def reload_config(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(ReloadConfigRequest, raw)
        if self._reload is None:
            raise Unimplemented("this gateway cannot reload its config")
        try:
            message = await self._reload(request.config_yaml)
        except ConfigError as error:
            raise InvalidArgument(f"config refused, the running config keeps serving: {error}") from None
        return ReloadConfigResponse(message=message).SerializeToString()

    async def set_traffic(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(SetTrafficRequest, raw)
        traffic = self._traffic() if callable(self._traffic) else self._traffic
        if traffic is None:
            raise InvalidArgument("this gateway has no traffic stage")
        model = request.model
        if not model or len(model) > 256:
            raise InvalidArgument("SetTraffic: `model` is empty or too long; expected the name of a routed model")
        if not traffic.routes(model):
            raise InvalidArgument(f"SetTraffic: model '{model[:64]}' is not routed by this gateway")
        shadow = None
        try:
            if request.shadow_json:
                try:
                    mapping = json.loads(request.shadow_json)
                except ValueError as error:
                    raise ConfigError("shadow_json", f"expected a JSON object: {error}") from None
                shadow = load_dataclass(ShadowConfig, mapping, "shadow")
                traffic.check_shadow(model, shadow)
            if request.split:
                traffic.check_split(model, dict(request.split))
        except ConfigError as error:
            raise InvalidArgument(f"SetTraffic: {error}") from None
        # Everything checked: apply (nothing above changed any state).
        if request.clear_split:
            traffic.clear_split(model)
        if request.split:
            traffic.set_split(model, dict(request.split))
        if request.clear_shadow:
            traffic.clear_shadow(model)
        if shadow is not None:
            traffic.set_shadow(model, shadow)
        return Snapshot(json=json.dumps(traffic.snapshot().get(model), default=str)).SerializeToString()

    async def get_snapshot(self, raw: bytes, call: Call) -> bytes:
        parse_request(SnapshotRequest, raw)
        snapshot = self._snapshot()
        if inspect.isawaitable(snapshot):  # a worker of several asks its parent for the merged view
            snapshot = await snapshot
        return Snapshot(json=json.dumps(snapshot, default=str)).SerializeToString()
