"""The front door: `inference.GRPCInferenceService` as raw-bytes grpc.aio handlers.

Handlers take and return serialized bytes (no gRPC (de)serializer): the gateway parses each request
once with upb, and errors in parsing become INVALID_ARGUMENT instead of an opaque INTERNAL.
GatewayError is translated to a gRPC status here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from gateway import __version__
from gateway.errors import GatewayError, InvalidArgument, PermissionDenied, Unimplemented
from gateway.protocol import INFERENCE_SERVICE, pb
from gateway.server.pipeline import Pipeline
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.fleet import Fleet

log = logging.getLogger(__name__)

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


def _parse(message_type: type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except DecodeError as error:
        raise InvalidArgument(f"request is not a valid {message_type.DESCRIPTOR.name}: {error}") from None


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceService:
    """Serves the KServe v2 / Triton inference protocol on top of the pipeline."""

    def __init__(self, pipeline: Pipeline, fleet: Fleet, catalog: ModelCatalog, server_name: str = "triton") -> None:
        self.pipeline = pipeline
        self.fleet = fleet
        self.catalog = catalog
        self.server_name = server_name

    # ---- registration ------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        unary = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelInfer": self.model_infer,
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
        handlers = {name: grpc.unary_unary_rpc_method_handler(_translated(fn)) for name, fn in unary.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers)

    @staticmethod
    def _refuse(error: GatewayError) -> Callable:
        async def refuse(raw: bytes, context):
            raise error

        return refuse

    # ---- health and metadata -----------------------------------------------------------------

    async def server_live(self, raw: bytes, context) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, raw: bytes, context) -> bytes:
        ready = any(b.healthy for b in self.fleet.backends())
        return pb.ServerReadyResponse(ready=ready).SerializeToString()

    async def server_metadata(self, raw: bytes, context) -> bytes:
        # `name` is what stock clients check ("triton" by default, `server.name`); the gateway's own
        # identity is the version and the extension "tensorgate".
        return pb.ServerMetadataResponse(
            name=self.server_name, version=__version__,
            extensions=["statistics", "sequence", "streaming", SERVER_EXTENSION],
        ).SerializeToString()

    async def model_ready(self, raw: bytes, context) -> bytes:
        request = _parse(pb.ModelReadyRequest, raw)
        ready = self.pipeline.router.routes(request.name) and any(
            b.healthy and b.serves(request.name, request.version) for b in self.fleet.backends()
        )
        return pb.ModelReadyResponse(ready=bool(ready)).SerializeToString()

    async def _info(self, raw: bytes, message_type: type):
        request = _parse(message_type, raw)
        if not self.pipeline.router.routes(request.name):
            raise self.catalog.not_found(request.name, request.version)
        return await self.catalog.get(request.name, request.version)

    async def model_metadata(self, raw: bytes, context) -> bytes:
        info = await self._info(raw, pb.ModelMetadataRequest)
        return info.metadata.SerializeToString()

    async def model_config(self, raw: bytes, context) -> bytes:
        info = await self._info(raw, pb.ModelConfigRequest)
        return info.config.SerializeToString()

    async def repository_index(self, raw: bytes, context) -> bytes:
        request = _parse(pb.RepositoryIndexRequest, raw)
        response = pb.RepositoryIndexResponse()
        healthy_models = {key for b in self.fleet.backends() if b.healthy for key in b.ready_models}
        for name, version in sorted(self.fleet.known_models()):
            if not version or not self.pipeline.router.routes(name):
                continue
            ready = (name, version) in healthy_models
            if request.ready and not ready:
                continue
            response.models.add(
                name=name, version=version, state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "no healthy backend serves it",
            )
        return response.SerializeToString()

    async def model_statistics(self, raw: bytes, context) -> bytes:
        from gateway.server.statistics import model_statistics

        request = _parse(pb.ModelStatisticsRequest, raw)
        response = await model_statistics(self.pipeline, self.fleet, request, context.time_remaining())
        return response.SerializeToString()

    # ---- inference -----------------------------------------------------------------------------

    def _trace_metadata(self, context):
        """The call's metadata, read only when tracing is on (reading it costs on every request)."""
        return context.invocation_metadata() if self.pipeline.trace_starter is not None else None

    def _parse_infer(self, raw: bytes):
        started = time.perf_counter_ns()
        try:
            return _parse(pb.ModelInferRequest, raw)
        except GatewayError as error:
            self.pipeline.refused("", "", error, started)  # counted, under an unknown model
            raise

    async def model_infer(self, raw: bytes, context) -> bytes:
        request = self._parse_infer(raw)
        response = await self.pipeline.infer(request, _deadline(context), self._trace_metadata(context))
        return response.SerializeToString()

    async def model_stream_infer(self, request_iterator, context):
        """Bidirectional stream: requests are served concurrently; each response (or error) is sent
        as soon as it is ready, an error as a ModelStreamInferResponse with error_message, the way
        Triton does, and the stream stays open."""
        outbox: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        deadline = _deadline(context)
        metadata = self._trace_metadata(context)  # a stream's trace context applies to each of its requests
        done_reading = object()

        async def serve_one(raw: bytes) -> None:
            request_id = ""
            try:
                request = self._parse_infer(raw)
                request_id = request.id
                async for response in self.pipeline.infer_stream(request, deadline, metadata):
                    outbox.put_nowait(pb.ModelStreamInferResponse(infer_response=response).SerializeToString())
            except GatewayError as error:
                failure = pb.ModelStreamInferResponse(error_message=error.message)
                failure.infer_response.id = request_id
                outbox.put_nowait(failure.SerializeToString())
            except Exception as error:  # never let one request kill the stream or the gateway
                log.exception("stream request failed unexpectedly")
                failure = pb.ModelStreamInferResponse(error_message=f"internal gateway error: {error!r}")
                failure.infer_response.id = request_id
                outbox.put_nowait(failure.SerializeToString())

        async def read_requests() -> None:
            try:
                async for raw in request_iterator:
                    task = asyncio.ensure_future(serve_one(raw))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
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


def _translated(handler: Callable) -> Callable:
    """Wrap a raw-bytes unary handler so GatewayError ends the call with its gRPC status."""

    async def call(raw: bytes, context):
        try:
            return await handler(raw, context)
        except GatewayError as error:
            await context.abort(error.code, error.message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a gateway bug answers INTERNAL; the server keeps serving
            log.exception("%s failed unexpectedly", getattr(handler, "__name__", handler))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal gateway error: {error!r}")

    call.__name__ = getattr(handler, "__name__", "handler")
    return call
