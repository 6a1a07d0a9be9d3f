"""Local Triton: real tritonserver processes from the nvidia-pytriton wheel, for tests and dev."""

from gateway.local.triton import (
    LocalTriton,
    TritonLaunchError,
    default_model_repository,
    find_free_port,
    triton_binary,
)

__all__ = [
    "LocalTriton",
    "TritonLaunchError",
    "default_model_repository",
    "find_free_port",
    "triton_binary",
]
