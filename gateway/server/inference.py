"""The front door: `inference.GRPCInferenceService` as engine-neutral raw-bytes handlers.

Handlers take and return serialized bytes (gateway/server/rpc.py): the gateway parses each request
once with upb, and errors in parsing become INVALID_ARGUMENT instead of an opaque INTERNAL. What a
handler raises becomes the call's status in the engine, through `rpc.status_of`.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import AsyncIterator, Callable

from gateway import __version__
from gateway.errors import GatewayError, PermissionDenied, Unimplemented
from gateway.pipeline.core import Pipeline
from gateway.protocol import INFERENCE_SERVICE, pb
from gateway.routing.dispatcher import sequence_of
from gateway.security.guard import Guard
from gateway.server.model_statistics import PeerCounts, model_statistics
from gateway.server.readiness import Readiness
from gateway.server.rpc import Call, Method, methods_of, parse_request, status_of
from gateway.upstream.fleet import Fleet

#: The ServerMetadata extension by which a client can tell the gateway from a Triton server.
SERVER_EXTENSION = "tensorgate"

SHARED_MEMORY_REASON = (
    "shared memory cannot cross the gateway: the gateway and the Triton backends run on different "
    "hosts; send tensor contents in the request"
)
REPOSITORY_REASON = (
    "model repository control is not allowed through the gateway: model versions are immutable "
    "endpoints, loaded on the backends by the deployment, not by clients"
)
SETTINGS_REASON = (
    "trace and log settings are per Triton server and are not changed through the gateway; set them "
    "on each backend"
)


class InferenceService:
    """Serves the KServe v2 / Triton inference protocol on top of the pipeline."""

    def __init__(self, pipeline: Pipeline, fleet: Fleet, server_name: str = "triton", guard: Guard | None = None,
                 peer_counts: PeerCounts | None = None, readiness: Readiness | None = None) -> None:
        self.pipeline = pipeline
        self.fleet = fleet
        self.server_name = server_name
        self.readiness = readiness if readiness is not None else Readiness()
        """Draining (SIGTERM): ServerReady false, new requests refused at the end; requests in flight counted."""
        self.guard = guard
        """Tenants' model allow-lists and request limits (gateway/security/guard.py), or None: then
        no call does any of this work. Who is calling (call.tenant) is set by server/access.py."""
        self.peer_counts = peer_counts
        """The other workers' counts, which ModelStatistics adds (gateway/workers/); None: one process."""

    def __repr__(self) -> str:
        return f"<InferenceService {self.pipeline!r}>"

    # ---- registration ------------------------------------------------------------------------

    def methods(self) -> list[Method]:
        unary = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelInfer": self.model_infer if self.guard is None else self.model_infer_guarded,
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self._refuse(PermissionDenied(REPOSITORY_REASON)),
            "RepositoryModelUnload": self._refuse(PermissionDenied(REPOSITORY_REASON)),
            "SystemSharedMemoryStatus": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "SystemSharedMemoryRegister": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "SystemSharedMemoryUnregister": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "CudaSharedMemoryStatus": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "CudaSharedMemoryRegister": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "CudaSharedMemoryUnregister": self._refuse(Unimplemented(SHARED_MEMORY_REASON)),
            "TraceSetting": self._refuse(PermissionDenied(SETTINGS_REASON)),
            "LogSettings": self._refuse(PermissionDenied(SETTINGS_REASON)),
        }
        # ModelInfer's messages are admitted by the engine (before they are read in full where it
        # can); ModelStreamInfer's, one by one in model_stream_infer.
        gates = {"ModelInfer": self.pipeline.admission.total}
        return methods_of(INFERENCE_SERVICE, unary, {"ModelStreamInfer": self.model_stream_infer}, gates)

    @staticmethod
    def _refuse(error: GatewayError) -> Callable:
        async def refuse(raw: bytes, call: Call):
            raise error

        return refuse

    # ---- health and metadata -----------------------------------------------------------------

    async def server_live(self, raw: bytes, call: Call) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, raw: bytes, call: Call) -> bytes:
        ready = not self.readiness.draining and any(b.healthy for b in self.fleet.backends())
        return pb.ServerReadyResponse(ready=ready).SerializeToString()

    async def server_metadata(self, raw: bytes, call: Call) -> bytes:
        # `name` is what stock clients check ("triton" by default, `server.name`); the gateway's own
        # identity is the version and the extension "tensorgate".
        return pb.ServerMetadataResponse(
            name=self.server_name, version=__version__,
            extensions=["statistics", "sequence", "streaming", SERVER_EXTENSION],
        ).SerializeToString()

    async def model_ready(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(pb.ModelReadyRequest, raw)
        if self.guard is not None:
            self.guard.check_model(call, request.name)
        ready = not self.readiness.draining and self.pipeline.routes(request.name) and any(
            b.healthy and b.serves(request.name, request.version) for b in self.fleet.backends()
        )
        return pb.ModelReadyResponse(ready=bool(ready)).SerializeToString()

    async def _info(self, raw: bytes, message_type: type, call: Call):
        request = parse_request(message_type, raw)
        if self.guard is not None:
            self.guard.check_model(call, request.name)
        return await self.pipeline.info(request.name, request.version)

    async def model_metadata(self, raw: bytes, call: Call) -> bytes:
        info = await self._info(raw, pb.ModelMetadataRequest, call)
        return info.metadata.SerializeToString()

    async def model_config(self, raw: bytes, call: Call) -> bytes:
        info = await self._info(raw, pb.ModelConfigRequest, call)
        return info.config.SerializeToString()

    async def repository_index(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(pb.RepositoryIndexRequest, raw)
        response = pb.RepositoryIndexResponse()
        healthy_models = {key for b in self.fleet.backends() if b.healthy for key in b.ready_models}
        for name, version in sorted(self.fleet.known_models()):
            if not version or not self.pipeline.routes(name):
                continue
            if self.guard is not None and not self.guard.may_use(call, name):
                continue  # a tenant does not learn of models it may not use
            ready = (name, version) in healthy_models
            if request.ready and not ready:
                continue
            response.models.add(
                name=name, version=version, state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "no healthy backend serves it",
            )
        return response.SerializeToString()

    async def model_statistics(self, raw: bytes, call: Call) -> bytes:
        request = parse_request(pb.ModelStatisticsRequest, raw)
        guard = self.guard
        if guard is not None and request.name:
            guard.check_model(call, request.name)
        response = await model_statistics(self.pipeline, self.fleet, request, call.deadline, self.peer_counts)
        if guard is not None and not request.name:  # every model: only those the tenant may use
            allowed = [stats for stats in response.model_stats if guard.may_use(call, stats.name)]
            del response.model_stats[:]
            response.model_stats.extend(allowed)
        return response.SerializeToString()

    # ---- inference -----------------------------------------------------------------------------

    def _parse_infer(self, raw: bytes):
        started = time.perf_counter_ns()
        try:
            return parse_request(pb.ModelInferRequest, raw)
        except GatewayError as error:
            self.pipeline.refused("", "", error, started)  # counted, under an unknown model
            raise

    def _enter_gateway(self, size: int):
        """Admit one stream message under the gateway's limits (admission.max_inflight,
        max_request_bytes); the caller releases it."""
        gate = self.pipeline.admission.total
        gate.admit(size)
        return gate

    async def model_infer(self, raw: bytes, call: Call) -> bytes:
        readiness = self.readiness
        readiness.admitted()
        try:
            # Admitted under the gateway's limits by the engine (Method.gate); the model's, here.
            size = len(raw)
            request = self._parse_infer(raw)
            raw = None  # parsed: the client's bytes may go (the envoy engine holds no other reference)
            response = await self.pipeline.infer(request, call.deadline, call, size)
            request = None  # answered and observed: its tensors may go before the answer is serialized
        finally:
            readiness.finished()
        return response.SerializeToString()

    async def model_infer_guarded(self, raw: bytes, call: Call) -> bytes:
        """ModelInfer with the guard's checks: the tenant may use the model, the request is within
        the limits (its rate was spent when the call was authenticated)."""
        readiness = self.readiness
        readiness.admitted()
        try:
            size = len(raw)
            request = self._parse_infer(raw)
            raw = None
            self.guard.check_infer(call, request, size, False)
            response = await self.pipeline.infer(request, call.deadline, call, size)
            request = None
        finally:
            readiness.finished()
        return response.SerializeToString()

    async def model_stream_infer(self, requests: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
        """Bidirectional stream: requests are served concurrently; each response (or error) is sent
        as soon as it is ready, an error as a ModelStreamInferResponse with error_message, the way
        Triton does, and the stream stays open. The steps of one sequence are served in the order
        they came, one after another (Triton's own stream keeps a sequence in order; clients such
        as tritonclient's async_stream_infer send the next step without waiting for the last)."""
        outbox: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        last_step: dict[object, asyncio.Task] = {}  # sequence id -> the task of its latest step
        deadline = call.deadline  # the stream's deadline and headers (trace context) apply to each of its requests
        check = None if self.guard is None else self.guard.check_infer  # each request spends from the rate
        done_reading = object()

        readiness = self.readiness

        async def serve_one(request, error, after: asyncio.Task | None, size: int) -> None:
            request_id = request.id if request is not None else ""
            counted = False
            try:
                if error is not None:
                    raise error
                readiness.admitted()
                counted = True
                if after is not None:
                    await asyncio.wait((after,))  # its outcome is its own; only the order matters here
                gate = self._enter_gateway(size)
                try:
                    async for response in self.pipeline.infer_stream(request, deadline, call, size):
                        outbox.put_nowait(pb.ModelStreamInferResponse(infer_response=response).SerializeToString())
                finally:
                    gate.release(size)
            except Exception as failure:  # one request's error never ends the stream, nor the gateway
                _, message = status_of(failure, "ModelStreamInfer")
                answer = pb.ModelStreamInferResponse(error_message=message)
                answer.infer_response.id = request_id
                outbox.put_nowait(answer.SerializeToString())
            finally:
                if counted:
                    readiness.finished()

        def forget_step(sequence_id, task: asyncio.Task) -> None:
            if last_step.get(sequence_id) is task:
                del last_step[sequence_id]

        async def read_requests() -> None:
            try:
                async for raw in requests:
                    request = error = None
                    try:
                        request = self._parse_infer(raw)
                        if check is not None:
                            check(call, request, len(raw), True)
                    except GatewayError as refused:
                        error = refused
                    sequence = sequence_of(request) if request is not None else None
                    after = last_step.get(sequence[0]) if sequence is not None else None
                    task = asyncio.ensure_future(serve_one(request, error, after, len(raw)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if sequence is not None:
                        last_step[sequence[0]] = task
                        task.add_done_callback(partial(forget_step, sequence[0]))
            finally:
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                outbox.put_nowait(done_reading)

        reader = asyncio.ensure_future(read_requests())
        try:
            while True:
                item = await outbox.get()
                if item is done_reading:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
