"""What one inference request may hold: tensors, BYTES element length, message size per model.

Checked at the front door on the parsed request, before validation and batching, so an oversized
request costs nothing further. Each refusal names what was wrong and the limit (and its config key).
"""

from __future__ import annotations

from gateway.errors import InvalidArgument, ResourceExhausted
from gateway.ext import bytes_longest_element
from gateway.security.config import LimitsConfig
from gateway.security.tenants import shown


class RequestLimits:
    """The configured limits; `check(request, size)` raises on the first one a request breaks."""

    __slots__ = ("max_tensors", "max_element", "message_bytes")

    def __init__(self, config: LimitsConfig) -> None:
        self.max_tensors = config.max_tensors
        self.max_element = config.max_bytes_element_bytes
        self.message_bytes = {model: limit.max_message_bytes for model, limit in config.models.items()
                              if limit.max_message_bytes is not None}

    def __repr__(self) -> str:
        return (f"<RequestLimits max_tensors={self.max_tensors} max_bytes_element_bytes={self.max_element} "
                f"per-model message limits={len(self.message_bytes)}>")

    def check(self, request, size: int) -> None:
        """Raise if `request` (a ModelInferRequest of `size` bytes on the wire) breaks a limit."""
        if self.message_bytes:
            limit = self.message_bytes.get(request.model_name)
            if limit is not None and size > limit:
                raise ResourceExhausted(
                    f"request of {size} bytes is over model {shown(request.model_name)}'s limit of {limit} bytes "
                    f"(limits.models.<model>.max_message_bytes)")
        if self.max_tensors is not None:
            count = len(request.inputs) + len(request.outputs)
            if count > self.max_tensors:
                raise InvalidArgument(
                    f"request has {count} tensors ({len(request.inputs)} inputs, {len(request.outputs)} "
                    f"outputs requested); the limit is {self.max_tensors} (limits.max_tensors)")
        if self.max_element is not None:
            self._check_bytes_elements(request)

    def _check_bytes_elements(self, request) -> None:
        raw = request.raw_input_contents
        for index, tensor in enumerate(request.inputs):
            if tensor.datatype != "BYTES":
                continue
            if index < len(raw):
                longest = bytes_longest_element(raw[index])  # -1 (corrupt) is validation's to word
            else:
                longest = max(map(len, tensor.contents.bytes_contents), default=0)
            if longest > self.max_element:
                raise InvalidArgument(
                    f"input {shown(tensor.name)} has a BYTES element of {longest} bytes; the limit is "
                    f"{self.max_element} bytes (limits.max_bytes_element_bytes)")
