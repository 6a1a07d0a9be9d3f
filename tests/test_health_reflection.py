"""grpc.health.v1 and server reflection, as their stock clients use them (grpcio-health-checking's
HealthStub, as grpc_health_probe and Kubernetes' gRPC probes call it; grpcio-reflection's
ProtoReflectionDescriptorDatabase, as grpcurl and Postman discover a server)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import service_pb2

from tests.conftest import gateway_on
from tests.servers import UpstreamProxy
from tests.waiting import wait_until

INFERENCE = "inference.GRPCInferenceService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_status(channel, want: int, timeout: float = 20.0) -> None:
    """Until the whole server's health is `want`."""
    wait_until(lambda: _check(channel), f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} ({want})",
               timeout, accept=lambda status: status == want)


def test_health_follows_the_backends(tritons, front_door):
    proxy = UpstreamProxy(tritons[0].grpc_address)
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [proxy.address]}},
              "health": {"interval_s": 0.1, "timeout_s": 2.0, "unhealthy_after": 2},
              "upstream": {"transport": "grpc-stream"}}  # the proxy speaks gRPC only
    try:
        with gateway_on(front_door, config) as gateway, grpc.insecure_channel(gateway.address) as channel:
            # Watch, as Kubernetes' and meshes' probes use it: the status now, then every change.
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == SERVING
            assert _check(channel) == SERVING  # the whole server
            assert _check(channel, INFERENCE) == SERVING  # the inference service by name
            with pytest.raises(grpc.RpcError) as error:
                _check(channel, "no.such.Service")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND  # as the health protocol asks
            proxy.stop()  # the only backend goes away
            _wait_status(channel, NOT_SERVING)
            assert next(watch).status == NOT_SERVING
            assert _check(channel, INFERENCE) == NOT_SERVING
            proxy.start()
            _wait_status(channel, SERVING)
            assert next(watch).status == SERVING
            watch.cancel()
            assert not gateway.take_loop_errors()
    finally:
        proxy.close()


def test_reflection_describes_the_services_and_drives_a_call(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) >= {INFERENCE, "tensorgate.admin.v1.DriftService", "grpc.health.v1.Health",
                                                 "grpc.reflection.v1alpha.ServerReflection"}
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(INFERENCE)
        assert {m.name for m in service.methods} >= {"ServerLive", "ServerReady", "ModelMetadata", "ModelInfer",
                                                     "ModelStreamInfer", "RepositoryIndex"}
        infer = service.FindMethodByName("ModelInfer")
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        # Field for field what tritonclient compiles in (names, numbers, types): wire-compatible.
        ours, theirs = infer.input_type, service_pb2.ModelInferRequest.DESCRIPTOR
        assert sorted((f.name, f.number, f.type) for f in ours.fields) == sorted(
            (f.name, f.number, f.type) for f in theirs.fields)
        drift = pool.FindServiceByName("tensorgate.admin.v1.DriftService")
        assert {m.name for m in drift.methods} == {"GetDriftReport", "ListAlerts", "SetReference", "ResetReference"}

        # As grpcurl does: messages built from the reflected descriptors alone, then a real call.
        request_class = message_factory.GetMessageClass(infer.input_type)
        response_class = message_factory.GetMessageClass(infer.output_type)
        request = request_class(model_name="simple_scale")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())
        call = channel.unary_unary(f"/{INFERENCE}/ModelInfer", request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        response = call(request, timeout=10)
        assert response.model_name == "simple_scale"
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("OUTPUT0", "FP32", [1, 16])]
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32),
                                      np.arange(16, dtype=np.float32) * 2)


def test_admin_snapshot_reports_the_live_state(gateway, tritons):
    """tensorgate.admin.v1.GatewayService/GetSnapshot, on every front door: the backends with their
    pools and health, what they served, DNS discovery, routing decisions, sequences and batching."""
    client = triton_grpc.InferenceServerClient(gateway.address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    before = gateway.admin_snapshot()
    client.infer("simple_scale", [tensor])
    after = gateway.admin_snapshot()
    assert set(after) == {"backends", "discovery", "routing", "placement", "probes", "traffic", "sequences", "batching",
                          "drift", "tenants", "resilience", "serving"}
    assert after["discovery"] == {}  # no pool of the shared gateway is found by DNS
    assert after["tenants"] == {}  # no auth configured
    # The model's placement table: its pools, each backend's learned service time.
    placement = next(table for key, table in after["placement"].items() if key.startswith("simple_scale"))
    assert {address for pool in placement["pools"].values() for address in pool["backends"]} == {
        tritons[0].grpc_address, tritons[1].grpc_address}
    assert {address: b["pool"] for address, b in after["backends"].items()} == {
        tritons[0].grpc_address: "primary", tritons[1].grpc_address: "secondary"}
    assert all(b["health"] == "healthy" for b in after["backends"].values())
    served = lambda snapshot: sum(b["served"] for b in snapshot["backends"].values())  # noqa: E731
    assert served(after) == served(before) + 1
    assert sum(after["routing"].values()) == sum(before["routing"].values()) + 1
    client.close()
