"""The gRPC contracts of protos/ as message classes, loaded from a private descriptor pool.

Why a private pool: `tritonclient` registers Triton's own generated files (package `inference`, the
same message names) in protobuf's default pool, and a second definition of `inference.ModelInferRequest`
there is a hard error. Applications and our tests import both, so the gateway builds its classes
from the FileDescriptorSet that `setup.py` compiles from protos/ with grpcio-tools, in a pool of its
own. The wire format is unaffected: only field numbers travel.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET_PATH = Path(__file__).with_name("tensorgate.binpb")

INFERENCE_SERVICE = "inference.GRPCInferenceService"


def _load_pool() -> descriptor_pool.DescriptorPool:
    try:
        data = DESCRIPTOR_SET_PATH.read_bytes()
    except FileNotFoundError as error:  # a source checkout that was never built
        raise ImportError(
            f"{DESCRIPTOR_SET_PATH} is missing: build the protocol with `make protos` (or pip install -e .)"
        ) from error
    pool = descriptor_pool.DescriptorPool()
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file_proto)
    return pool


POOL = _load_pool()


def message_class(full_name: str) -> type:
    """The message class of `full_name` (e.g. 'inference.ModelInferRequest') in the private pool."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


class _Inference:
    """Namespace of the inference.* messages, resolved once: `pb.ModelInferRequest`, …"""

    def __getattr__(self, name: str) -> type:
        cls = message_class(f"inference.{name}")
        setattr(self, name, cls)
        return cls


pb = _Inference()


def parameter_value(value):
    """What an InferParameter holds (bool, int, float or str), or None when it holds nothing."""
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)
