"""`tensorgate.admin.v1.GatewayService`: the gateway's live state over gRPC, on any engine."""

from __future__ import annotations

import inspect
import json
from typing import Callable

from gateway.protocol import message_class
from gateway.server.rpc import Call, Method, methods_of, parse_request

SERVICE = "tensorgate.admin.v1.GatewayService"
SnapshotRequest = message_class("tensorgate.admin.v1.SnapshotRequest")
Snapshot = message_class("tensorgate.admin.v1.Snapshot")


class GatewayService:
    """Answers GetSnapshot with `snapshot()` (Gateway.snapshot, or an awaitable of it) as JSON."""

    def __init__(self, snapshot: Callable[[], object]) -> None:
        self._snapshot = snapshot

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {"GetSnapshot": self.get_snapshot})

    async def get_snapshot(self, raw: bytes, call: Call) -> bytes:
        parse_request(SnapshotRequest, raw)
        snapshot = self._snapshot()
        if inspect.isawaitable(snapshot):  # a worker of several asks its parent for the merged view
            snapshot = await snapshot
        return Snapshot(json=json.dumps(snapshot, default=str)).SerializeToString()
