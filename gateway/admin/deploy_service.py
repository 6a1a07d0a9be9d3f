"""`tensorgate.admin.v1.DeployService`: gated rollouts and rollbacks of model versions over gRPC."""

from __future__ import annotations

import json

from gateway.errors import FailedPrecondition
from gateway.protocol import message_class
from gateway.rollout.controller import RolloutController
from gateway.server.rpc import Call, Method, methods_of, parse_request

SERVICE = "tensorgate.admin.v1.DeployService"


def messages() -> dict[str, type]:
    names = ["StartRolloutRequest", "GetRolloutRequest", "RollbackRequest", "RolloutState"]
    return {name: message_class(f"tensorgate.admin.v1.{name}") for name in names}


class DeployService:
    """The rollout controller over gRPC. Without one (a gateway of several worker processes, where
    each would run a rollout of its own) every call is FAILED_PRECONDITION, saying why."""

    def __init__(self, rollouts: RolloutController | None) -> None:
        self._rollouts = rollouts
        self.m = messages()

    @property
    def rollouts(self) -> RolloutController:
        if self._rollouts is None:
            raise FailedPrecondition("rollouts run in a gateway of one process (server.workers: 1); this one has "
                                     "several workers, each of which would run its own")
        return self._rollouts

    def __repr__(self) -> str:
        return f"<DeployService {self._rollouts!r}>"

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {
            "StartRollout": self.start_rollout,
            "GetRollout": self.get_rollout,
            "Rollback": self.rollback,
        })

    def _answer(self, model: str) -> bytes:
        return self.m["RolloutState"](json=json.dumps(self.rollouts.states(model), default=str)).SerializeToString()

    async def start_rollout(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(self.m["StartRolloutRequest"], raw)
        self.rollouts.begin(request.model, request.version, actor=request.actor or "admin-api", reason=request.reason,
                            steps=list(request.steps), step_seconds=request.step_seconds,
                            min_requests=request.min_requests, shadow_first=request.shadow_first)
        return self._answer(request.model)

    async def get_rollout(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(self.m["GetRolloutRequest"], raw)
        return self._answer(request.model)

    async def rollback(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(self.m["RollbackRequest"], raw)
        await self.rollouts.rollback(request.model, actor=request.actor or "admin-api", reason=request.reason)
        return self._answer(request.model)
