"""The requests `tensorgate bench` sends: built from a model's metadata, or from data files.

    model = fetch_model_inputs("127.0.0.1:8001", "mlp")            # ModelMetadata + ModelConfig
    payloads = random_payloads(model, batch_size=4, shapes={"INPUT0": [16]})
    payloads = file_payloads(model, ["data.npz"])                    # or .npy, or perf_analyzer's JSON

Every payload is a serialized ModelInferRequest with its tensors in `raw_input_contents`, built once
before the load starts, so sending costs the client nothing but the gRPC call.

Shapes: a model with `max_batch_size > 0` takes a leading batch dimension (`--batch-size`, 1 by
default); every other variable (-1) dimension must be given (`--shape NAME:1,16`, the dims without
the batch dimension, as perf_analyzer's `--shape`). Where the target answers no ModelConfig, a
leading -1 of a shape with more than one dimension is taken for the batch dimension.

Data files:
  - `.npy`: one array, for a model with one input, or `NAME=file.npy` for a named input;
  - `.npz`: one array per input, by name;
  - `.json`: perf_analyzer's format, `{"data": [{"NAME": [values...] | {"content": [...], "shape": [...]}}, ...]}`,
    one request per entry (the harness cycles through them); a bare list of values takes its shape
    from the metadata.
Arrays from .npy/.npz are whole requests: their shape is sent as is (batch dimension included).
BYTES inputs take strings (JSON) or numpy object/bytes arrays; random BYTES are ASCII strings of
`string_length` characters.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from gateway.protocol.tensors import NUMPY_DTYPES

__all__ = [
    "InputSpec",
    "ModelInputs",
    "InputError",
    "bytes_raw",
    "fetch_model_inputs",
    "file_payloads",
    "parse_shape_option",
    "random_payloads",
]

_METADATA_METHOD = "/inference.GRPCInferenceService/ModelMetadata"
_CONFIG_METHOD = "/inference.GRPCInferenceService/ModelConfig"


class InputError(ValueError):
    """The inputs asked for cannot be built (a shape or datatype missing or wrong, a bad file)."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """The dims without the batch dimension (-1: variable)."""


@dataclass(frozen=True)
class ModelInputs:
    model: str
    version: str
    inputs: tuple[InputSpec, ...]
    max_batch_size: int
    """0: the model takes no batch dimension."""


def fetch_model_inputs(target: str, model: str, version: str = "", timeout: float = 30.0) -> ModelInputs:
    """The inputs of `model` on the KServe v2 endpoint `target` (ModelMetadata, and ModelConfig
    where the target answers it, for max_batch_size)."""
    from gateway.protocol import pb

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        metadata_call = channel.unary_unary(_METADATA_METHOD)
        request = pb.ModelMetadataRequest(name=model, version=version).SerializeToString()
        try:
            metadata = pb.ModelMetadataResponse.FromString(metadata_call(request, timeout=timeout))
        except grpc.RpcError as error:
            raise InputError(f"{target} did not answer ModelMetadata for model {model!r}: "
                             f"{error.code().name}: {error.details()}") from error
        max_batch_size = None
        try:
            config_call = channel.unary_unary(_CONFIG_METHOD)
            reply = config_call(pb.ModelConfigRequest(name=model, version=version).SerializeToString(), timeout=timeout)
            max_batch_size = pb.ModelConfigResponse.FromString(reply).config.max_batch_size
        except grpc.RpcError:
            pass  # not every KServe v2 server answers Triton's ModelConfig; guess from the shapes below
    inputs = []
    for tensor in metadata.inputs:
        shape = tuple(int(dim) for dim in tensor.shape)
        batched = max_batch_size > 0 if max_batch_size is not None else (len(shape) > 1 and shape[0] == -1)
        inputs.append(InputSpec(tensor.name, tensor.datatype, shape[1:] if batched else shape))
    if max_batch_size is None:
        max_batch_size = 1 if any(len(t.shape) > 1 and t.shape[0] == -1 for t in metadata.inputs) else 0
    return ModelInputs(model, version, tuple(inputs), max_batch_size)


def parse_shape_option(texts: Sequence[str]) -> dict[str, list[int]]:
    """`["INPUT0:1,16", ...]` → {"INPUT0": [1, 16]}."""
    shapes = {}
    for text in texts:
        name, sep, dims = text.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(dim) for dim in dims.split(",") if dim.strip()]
        except ValueError:
            raise InputError(f"--shape {text!r}: expected NAME:D1,D2,... (e.g. INPUT0:1,16)") from None
        if any(dim < 0 for dim in shapes[name]):
            raise InputError(f"--shape {text!r}: dims must be >= 0")
    return shapes


def bytes_raw(values: np.ndarray) -> bytes:
    """BYTES elements as KServe v2 raw contents: each element's 4-byte little-endian length, then its bytes."""
    parts = []
    for element in values.reshape(-1):
        data = element if isinstance(element, bytes) else str(element).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _request(model: ModelInputs, tensors: dict[str, np.ndarray]) -> bytes:
    from gateway.protocol import pb

    request = pb.ModelInferRequest(model_name=model.model, model_version=model.version)
    for spec in model.inputs:
        values = tensors[spec.name]
        tensor = request.inputs.add()
        tensor.name = spec.name
        tensor.datatype = spec.datatype
        tensor.shape.extend(values.shape)
        if spec.datatype == "BYTES":
            request.raw_input_contents.append(bytes_raw(values))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(values, _numpy_dtype(spec)).tobytes())
    return request.SerializeToString()


def _numpy_dtype(spec: InputSpec):
    if spec.datatype not in NUMPY_DTYPES:
        raise InputError(f"input {spec.name}: datatype {spec.datatype} has no numpy type, so the harness can "
                         f"neither generate nor read its values")
    return NUMPY_DTYPES[spec.datatype]


def _full_shape(model: ModelInputs, spec: InputSpec, batch_size: int, shapes: dict[str, list[int]]) -> list[int]:
    dims = list(shapes.get(spec.name, spec.shape))
    if spec.name in shapes and len(dims) != len(spec.shape):
        raise InputError(f"--shape {spec.name}: {len(dims)} dims given, the model's input has {len(spec.shape)} "
                         f"{list(spec.shape)} (give the dims without the batch dimension)")
    if any(dim < 0 for dim in dims):
        raise InputError(f"input {spec.name} has variable dims {list(spec.shape)}: give them with "
                         f"--shape {spec.name}:{','.join('1' if d < 0 else str(d) for d in spec.shape)}")
    if model.max_batch_size > 0:
        if batch_size > model.max_batch_size:
            raise InputError(f"--batch-size {batch_size} is over the model's max_batch_size {model.max_batch_size}")
        return [batch_size, *dims]
    if batch_size != 1:
        raise InputError(f"model {model.model} takes no batch dimension (max_batch_size 0): --batch-size must be 1")
    return dims


def random_payloads(model: ModelInputs, *, batch_size: int = 1, shapes: dict[str, list[int]] | None = None,
                    count: int = 16, string_length: int = 16, seed: int = 0) -> list[bytes]:
    """`count` requests of random values of each input's datatype and shape."""
    shapes = shapes or {}
    unknown = set(shapes) - {spec.name for spec in model.inputs}
    if unknown:
        raise InputError(f"--shape names {sorted(unknown)}, not inputs of {model.model} "
                         f"(its inputs: {[spec.name for spec in model.inputs]})")
    rng = np.random.default_rng(seed)
    full = {spec.name: _full_shape(model, spec, batch_size, shapes) for spec in model.inputs}
    payloads = []
    for _ in range(count):
        tensors = {}
        for spec in model.inputs:
            tensors[spec.name] = _random_values(rng, spec, full[spec.name], string_length)
        payloads.append(_request(model, tensors))
    return payloads


def _random_values(rng: np.random.Generator, spec: InputSpec, shape: list[int], string_length: int) -> np.ndarray:
    if spec.datatype == "BYTES":
        letters = rng.integers(ord("a"), ord("z") + 1, (int(np.prod(shape)), string_length), dtype=np.uint8)
        return np.array([row.tobytes() for row in letters], dtype=object).reshape(shape)
    dtype = np.dtype(_numpy_dtype(spec))
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def file_payloads(model: ModelInputs, paths: Sequence[str]) -> list[bytes]:
    """The requests the data files describe (see the module's docstring for the formats)."""
    names = [spec.name for spec in model.inputs]
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict[str, np.ndarray]] = []
    for text in paths:
        name, sep, path_text = text.partition("=")
        if not sep or name.endswith((".npy", ".npz", ".json")):
            name, path_text = "", text
        path = Path(path_text)
        if not path.is_file():
            raise InputError(f"input data file {path} does not exist")
        if path.suffix == ".npy":
            if not name:
                if len(names) != 1:
                    raise InputError(f"{path}: model {model.model} has inputs {names}: name the one this file holds "
                                     f"(NAME={path})")
                name = names[0]
            arrays[name] = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays.update({key: npz[key] for key in npz.files})
        elif path.suffix == ".json":
            entries += _json_entries(model, path)
        else:
            raise InputError(f"{path}: expected a .npy, .npz or .json file")
    if arrays:
        entries.append(arrays)
    if not entries:
        raise InputError("no input data in the files given")
    payloads = []
    for entry in entries:
        missing = [name for name in names if name not in entry]
        if missing:
            raise InputError(f"the input data gives no values for {missing} (model {model.model} needs {names})")
        payloads.append(_request(model, {name: entry[name] for name in names}))
    return payloads


def _json_entries(model: ModelInputs, path: Path) -> list[dict[str, np.ndarray]]:
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not JSON ({error})") from error
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not data:
        raise InputError(f'{path}: expected {{"data": [{{"INPUT": [values...]}}, ...]}} (perf_analyzer\'s format)')
    specs = {spec.name: spec for spec in model.inputs}
    entries = []
    for index, item in enumerate(data):
        entry = {}
        for name, value in item.items():
            if name not in specs:
                raise InputError(f"{path}: entry {index} names {name!r}, not an input of {model.model} ({sorted(specs)})")
            spec = specs[name]
            shape = None
            if isinstance(value, dict):
                shape, value = value.get("shape"), value.get("content", value.get("b64"))
            if spec.datatype == "BYTES":
                values = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in np.ravel(value)], dtype=object)
            else:
                values = np.asarray(value, dtype=_numpy_dtype(spec))
            if shape is None:
                fixed = [dim for dim in spec.shape]
                shape = ([1] if model.max_batch_size > 0 else []) + fixed
                if any(dim < 0 for dim in shape):
                    raise InputError(f"{path}: entry {index}: input {name} has variable dims {list(spec.shape)}: "
                                     f'give {{"content": [...], "shape": [...]}}')
            try:
                entry[name] = values.reshape(shape)
            except ValueError as error:
                raise InputError(f"{path}: entry {index}: {values.size} values of {name} do not fit shape {shape}") from error
        entries.append(entry)
    return entries
