"""Model metadata and config, fetched from a backend that serves the model and cached.

Model versions are immutable endpoints, so a (model, version) entry never goes stale while that
version exists; entries for the unversioned name are refreshed when the fleet changes, since the
default version may move.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from gateway.errors import GatewayError, InvalidArgument, NotFound, Unavailable, shown
from gateway.protocol import pb
from gateway.protocol import triton_messages as triton
from gateway.protocol.tensors import ModelSignature
from gateway.upstream.fleet import Fleet


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway knows of one model version, as its backends report it."""

    metadata: object  # inference.ModelMetadataResponse
    config: object  # inference.ModelConfigResponse
    signature: ModelSignature


class ModelCatalog:
    def __init__(self, fleet: Fleet, timeout_s: float = 5.0) -> None:
        self._fleet = fleet
        self._timeout_s = timeout_s
        self._entries: dict[tuple[str, str], ModelInfo] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        fleet.on_change(self._forget_unversioned)

    def __repr__(self) -> str:
        return f"<ModelCatalog entries={len(self._entries)}>"

    def _forget_unversioned(self) -> None:
        for key in [k for k in self._entries if not k[1]]:
            del self._entries[key]

    async def get(self, model: str, version: str) -> ModelInfo:
        """The model's info; fetched once (concurrent callers share the fetch)."""
        key = (model, version)
        info = self._entries.get(key)
        if info is not None:
            return info
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(model, version))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    async def _fetch(self, model: str, version: str) -> ModelInfo:
        version = triton_version(version)
        candidates = [b for b in self._fleet.backends() if b.serves(model, version)]
        candidates.sort(key=lambda b: not b.routable)  # an ejected (maybe hung) backend last
        if not candidates:
            raise self.unreported(model, version)
        last_error: GatewayError | None = None
        for backend in candidates:
            try:
                metadata = await backend.call(
                    "ModelMetadata",
                    pb.ModelMetadataRequest(name=model, version=version),
                    pb.ModelMetadataResponse,
                    self._timeout_s,
                )
                config = await backend.call(
                    "ModelConfig",
                    pb.ModelConfigRequest(name=model, version=version),
                    pb.ModelConfigResponse,
                    self._timeout_s,
                )
            except GatewayError as error:
                last_error = error
                continue
            info = ModelInfo(metadata, config, ModelSignature.from_backend(metadata, config))
            self._entries[(model, version)] = info
            return info
        raise Unavailable(f"model '{shown(model)}': no backend answered for its metadata: {last_error.message}",
                          detail=last_error.detail)

    def unreported(self, model: str, version: str) -> GatewayError:
        """The refusal of a routed model no backend reports: not_found, except while no backend has
        passed a health check yet (the gateway started before its Tritons, or they are still
        loading). Then the gateway cannot tell an unknown model from one not reported yet, and says
        UNAVAILABLE: a client should retry, not give up."""
        refusal = self.not_found(model, version)  # raises first for a version Triton could not read
        backends = self._fleet.backends()
        if backends and not any(backend.checked_ok_at for backend in backends):
            first = backends[0]
            return Unavailable(
                f"model '{shown(model)}' is not known yet: none of the gateway's {len(backends)} backend(s) has "
                "passed a health check, so no backend has reported its models; retry",
                detail=f"{first.address} ({first.pool}): {first.health_detail}")
        return refusal

    def not_found(self, model: str, version: str) -> GatewayError:
        """The refusal of a model (or version) no backend serves, in Triton's words, then what is
        served; InvalidArgument instead for a version Triton could not read as a number."""
        version = triton_version(version)
        known = self._fleet.known_models()
        if version and (model, "") in known:
            versions = sorted(v for m, v in known if m == model and v)
            return NotFound(
                triton.UNKNOWN_VERSION.format(model=model, version=version)
                + f" on any backend of the gateway; available versions: {', '.join(versions)}"
            )
        names = sorted({m for m, _ in known})
        return NotFound(
            triton.UNKNOWN_MODEL.format(model=model)
            + f" on any backend of the gateway; available models: {', '.join(names) or 'none'}"
        )


#: What C's std::stol, which Triton reads a version with, accepts: a number after blanks, then anything.
_STOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def triton_version(version: str) -> str:
    """A requested version as Triton reads it ("01" and "1 " are version 1); "" stays "" (the latest).

    Raises InvalidArgument, in Triton's words, for a version Triton refuses: not a number, too large
    for 64 bits, or negative.
    """
    if not version or (version.isascii() and version.isdigit() and version[0] != "0" and len(version) < 19):
        return version
    number = _STOL.match(version)
    value = int(number.group(1)) if number else None
    if value is None or not -(2**63) <= value < 2**63:
        raise InvalidArgument(triton.VERSION_NOT_A_NUMBER.format(version=version))
    if value < 0:
        raise InvalidArgument(triton.VERSION_NEGATIVE.format(version=version))
    return str(value)
