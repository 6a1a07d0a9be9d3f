"""gRPC server reflection (`grpc.reflection.v1alpha.ServerReflection`) as an engine-neutral service.

The answers come from grpcio-reflection's own servicer, over the gateway's private descriptor pool
(gateway/protocol), one request at a time, so `grpcurl`, Postman and grpc_cli list and describe
the services on any engine.
"""

from __future__ import annotations

from typing import AsyncIterator

from grpc_reflection.v1alpha import reflection, reflection_pb2

from gateway.protocol import POOL
from gateway.server.rpc import Call, Method, methods_of

SERVICE = reflection.SERVICE_NAME


class ReflectionService:
    def __init__(self, service_names: list[str]) -> None:
        self._servicer = reflection.ReflectionServicer([*service_names, SERVICE], pool=POOL)

    def methods(self) -> list[Method]:
        return methods_of(SERVICE, {}, {"ServerReflectionInfo": self.server_reflection_info})

    async def server_reflection_info(self, requests: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
        async for raw in requests:
            request = reflection_pb2.ServerReflectionRequest.FromString(raw)
            for response in self._servicer.ServerReflectionInfo(iter((request,)), None):
                yield response.SerializeToString()
