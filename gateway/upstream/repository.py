"""Triton's model repository API on one backend: which versions of a model are loaded, and changing that.

Triton must run with `--model-control-mode=explicit`. A version set is changed by loading the model
again with its own configuration (read from the backend with ModelConfig) whose `version_policy`
names the versions: Triton keeps serving the versions that stay while it loads the new one, and a
version that fails to load leaves the others serving. The configuration sent must be complete: a
partial one (only `version_policy`) loads, but with no inputs or outputs (Triton 2.51 does not
complete it), so every request then fails.
"""

from __future__ import annotations

import asyncio
import json

from google.protobuf import json_format

from gateway.errors import FailedPrecondition, GatewayError
from gateway.protocol import pb
from gateway.upstream.backend import Backend

#: Loading a Python-backend version starts a stub process: seconds, more on a busy machine.
LOAD_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0


class RepositoryError(FailedPrecondition):
    """A backend refused or failed a repository call; the message says which backend and why."""


async def model_config(backend: Backend, model: str) -> dict:
    """The model's configuration as the backend serves it (JSON form, Triton's field names)."""
    response = await backend.call("ModelConfig", pb.ModelConfigRequest(name=model), pb.ModelConfigResponse,
                                  CALL_TIMEOUT_S)
    return json_format.MessageToDict(response.config, preserving_proto_field_name=True)


async def loaded_versions(backend: Backend, model: str) -> list[str]:
    """The versions of `model` the backend has READY, in version order."""
    index = await backend.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True), pb.RepositoryIndexResponse,
                               CALL_TIMEOUT_S)
    versions = {entry.version for entry in index.models
                if entry.name == model and entry.version and (not entry.state or entry.state == "READY")}
    return sorted(versions, key=int)


async def load_versions(backend: Backend, model: str, versions: list[str], config: dict) -> None:
    """Load exactly `versions` of `model` on the backend, with `config` (complete) as the base."""
    config = {**config, "version_policy": {"specific": {"versions": [int(v) for v in versions]}}}
    request = pb.RepositoryModelLoadRequest(model_name=model)
    request.parameters["config"].string_param = json.dumps(config)
    try:
        await backend.call("RepositoryModelLoad", request, pb.RepositoryModelLoadResponse, LOAD_TIMEOUT_S)
    except GatewayError as error:
        raise RepositoryError(f"backend {backend.address} could not load {model} versions {versions}: "
                              f"{error.message}") from None


async def server_ready(backend: Backend) -> bool:
    response = await backend.call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, CALL_TIMEOUT_S)
    return bool(response.ready)


async def wait_server_ready(backend: Backend, timeout_s: float) -> bool:
    """Poll ServerReady until it says ready (True) or `timeout_s` passes (False). A Triton with
    --strict-readiness reports not ready while any model loads or unloads, so the gateway's health
    check takes it out of rotation meanwhile: reload one backend at a time, and wait for this."""
    return await _poll(lambda: server_ready(backend), timeout_s, 0.1)


async def version_ready(backend: Backend, model: str, version: str) -> bool:
    response = await backend.call("ModelReady", pb.ModelReadyRequest(name=model, version=version),
                                  pb.ModelReadyResponse, CALL_TIMEOUT_S)
    return bool(response.ready)


async def wait_ready(backend: Backend, model: str, version: str, timeout_s: float) -> bool:
    """Poll ModelReady until the version is ready (True) or `timeout_s` passes (False)."""
    return await _poll(lambda: version_ready(backend, model, version), timeout_s, 0.2)


async def _poll(ready, timeout_s: float, every_s: float) -> bool:
    """Await `ready()` every `every_s` until it says True (True) or `timeout_s` passes (False); a
    call that fails (the backend busy loading, or away) counts as not ready yet."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if await ready():
                return True
        except GatewayError:
            pass
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(every_s)
