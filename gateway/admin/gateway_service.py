"""`tensorgate.admin.v1.GatewayService`: the gateway's live state over gRPC, and config reload, on any engine."""

from __future__ import annotations

import inspect
import json
from typing import Awaitable, Callable

from gateway.errors import ConfigError, InvalidArgument, Unimplemented
from gateway.protocol import message_class
from gateway.server.rpc import Call, Method, methods_of, parse_request

SERVICE = "tensorgate.admin.v1.GatewayService"
SnapshotRequest = message_class("tensorgate.admin.v1.SnapshotRequest")
Snapshot = message_class("tensorgate.admin.v1.Snapshot")
ReloadConfigRequest = message_class("tensorgate.admin.v1.ReloadConfigRequest")
ReloadConfigResponse = message_class("tensorgate.admin.v1.ReloadConfigResponse")


class GatewayService:
    """Answers GetSnapshot with `snapshot()` (Gateway.snapshot, or an awaitable of it) as JSON, and
    ReloadConfig with `reload(config_text)` (Gateway.reload_text: "" re-reads the config file;
    raises ConfigError for a config the loader refuses, which is the client's INVALID_ARGUMENT)."""

    def __init__(self, snapshot: Callable[[], object], reload: Callable[[str], Awaitable[str]] | None = None) -> None:
        self._snapshot = snapshot
        self._reload = reload

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {"GetSnapshot": self.get_snapshot, "ReloadConfig": self.reload_config})

    async def get_snapshot(self, raw: bytes, call: Call) -> bytes:
        parse_request(SnapshotRequest, raw)
        snapshot = self._snapshot()
        if inspect.isawaitable(snapshot):  # a worker of several asks its parent for the merged view
            snapshot = await snapshot
        return Snapshot(json=json.dumps(snapshot, default=str)).SerializeToString()

    async def reload_config(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(ReloadConfigRequest, raw)
        if self._reload is None:
            raise Unimplemented("this gateway cannot reload its config")
        try:
            message = await self._reload(request.config_yaml)
        except ConfigError as error:
            raise InvalidArgument(f"config refused, the running config keeps serving: {error}") from None
        return ReloadConfigResponse(message=message).SerializeToString()
