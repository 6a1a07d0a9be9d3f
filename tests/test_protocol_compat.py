"""Wire-compatibility check of our protos against tritonclient's descriptors.

Our ``protos/grpc_service.proto`` and ``protos/model_config.proto`` are
compiled with grpc_tools.protoc into a FileDescriptorSet and loaded into a
*private* DescriptorPool (tritonclient already registers files with the same
names and the same ``inference`` package in the default pool, so ours must not
go there). Every message, enum and RPC that tritonclient knows about is then
compared structurally against ours.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

import tritonclient.grpc.model_config_pb2 as tc_model_config_pb2
import tritonclient.grpc.service_pb2 as tc_service_pb2

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "protos"
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
SERVICE_NAME = "GRPCInferenceService"

TC_FILES = {
    "model_config.proto": tc_model_config_pb2.DESCRIPTOR,
    "grpc_service.proto": tc_service_pb2.DESCRIPTOR,
}


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("protos") / "tensorgate.pb"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        *PROTO_FILES,
    ]
    proc = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, f"protoc failed:\n{proc.stdout}\n{proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


@pytest.fixture(scope="module")
def our_pool(descriptor_set) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()  # private: never the default pool
    for fdp in descriptor_set.file:  # --include_imports emits deps first
        pool.Add(fdp)
    return pool


@pytest.fixture(scope="module")
def our_files(descriptor_set) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {f.name: f for f in descriptor_set.file}


def _tc_file_proto(name: str) -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    TC_FILES[name].CopyToProto(fdp)
    return fdp


# --------------------------------------------------------------------------
# Structural comparison helpers (work on *DescriptorProto objects)
# --------------------------------------------------------------------------

_TYPE_NAMES = {
    v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()
}
_LABEL_NAMES = {
    v: k for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()
}


def _field_sig(msg: descriptor_pb2.DescriptorProto, f) -> dict:
    oneof = None
    if f.HasField("oneof_index"):
        oneof = msg.oneof_decl[f.oneof_index].name
    return {
        "name": f.name,
        "number": f.number,
        "type": _TYPE_NAMES[f.type],
        "label": _LABEL_NAMES[f.label],
        "type_name": f.type_name or None,
        "oneof": oneof,
        "proto3_optional": f.proto3_optional,
        "packed": f.options.packed if f.options.HasField("packed") else None,
        "deprecated": f.options.deprecated,
    }


def _enum_diff(path: str, theirs, ours) -> list[str]:
    errs = []
    t_vals = {v.name: v.number for v in theirs.value}
    o_vals = {v.name: v.number for v in ours.value}
    if t_vals != o_vals:
        errs.append(f"enum {path}: values differ: tritonclient={t_vals} ours={o_vals}")
    return errs


def _message_diff(path: str, theirs, ours) -> list[str]:
    """Return a list of human-readable differences (empty == identical)."""
    errs: list[str] = []

    if theirs.options.map_entry != ours.options.map_entry:
        errs.append(
            f"{path}: map_entry tritonclient={theirs.options.map_entry} "
            f"ours={ours.options.map_entry}"
        )

    # Fields.
    t_fields = {f.name: _field_sig(theirs, f) for f in theirs.field}
    o_fields = {f.name: _field_sig(ours, f) for f in ours.field}
    for name in sorted(t_fields.keys() - o_fields.keys()):
        errs.append(f"{path}: missing field {name!r} {t_fields[name]}")
    for name in sorted(o_fields.keys() - t_fields.keys()):
        errs.append(f"{path}: extra field {name!r} {o_fields[name]}")
    for name in sorted(t_fields.keys() & o_fields.keys()):
        if t_fields[name] != o_fields[name]:
            errs.append(
                f"{path}.{name}: tritonclient={t_fields[name]} ours={o_fields[name]}"
            )

    # Oneofs (name -> ordered member list).
    def oneofs(m):
        groups = {d.name: [] for d in m.oneof_decl}
        for f in m.field:
            if f.HasField("oneof_index"):
                groups[m.oneof_decl[f.oneof_index].name].append(f.name)
        return {k: sorted(v) for k, v in groups.items()}

    if oneofs(theirs) != oneofs(ours):
        errs.append(
            f"{path}: oneofs differ: tritonclient={oneofs(theirs)} ours={oneofs(ours)}"
        )

    # Nested enums.
    t_enums = {e.name: e for e in theirs.enum_type}
    o_enums = {e.name: e for e in ours.enum_type}
    for name in sorted(t_enums.keys() - o_enums.keys()):
        errs.append(f"{path}: missing nested enum {name!r}")
    for name in sorted(o_enums.keys() - t_enums.keys()):
        errs.append(f"{path}: extra nested enum {name!r}")
    for name in sorted(t_enums.keys() & o_enums.keys()):
        errs += _enum_diff(f"{path}.{name}", t_enums[name], o_enums[name])

    # Nested messages (including synthesized map entries), recursively.
    t_nested = {n.name: n for n in theirs.nested_type}
    o_nested = {n.name: n for n in ours.nested_type}
    for name in sorted(t_nested.keys() - o_nested.keys()):
        errs.append(f"{path}: missing nested message {name!r}")
    for name in sorted(o_nested.keys() - t_nested.keys()):
        errs.append(f"{path}: extra nested message {name!r}")
    for name in sorted(t_nested.keys() & o_nested.keys()):
        errs += _message_diff(f"{path}.{name}", t_nested[name], o_nested[name])

    return errs


def _top_level(fdp: descriptor_pb2.FileDescriptorProto):
    return (
        {m.name: m for m in fdp.message_type},
        {e.name: e for e in fdp.enum_type},
        {s.name: s for s in fdp.service},
    )


def _all_top_level_messages():
    out = []
    for fname in PROTO_FILES:
        msgs, _, _ = _top_level(_tc_file_proto(fname))
        out += [(fname, m) for m in msgs]
    return out


def _all_top_level_enums():
    out = []
    for fname in PROTO_FILES:
        _, enums, _ = _top_level(_tc_file_proto(fname))
        out += [(fname, e) for e in enums]
    return out


def _tc_methods():
    svc = tc_service_pb2.DESCRIPTOR.services_by_name[SERVICE_NAME]
    return [m.name for m in svc.methods]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_private_pool_is_isolated(our_pool):
    assert our_pool is not descriptor_pool.Default()
    ours = our_pool.FindMessageTypeByName("inference.ModelInferRequest")
    theirs = tc_service_pb2.ModelInferRequest.DESCRIPTOR
    assert ours is not theirs
    # The default pool still serves tritonclient's version untouched.
    assert (
        descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
        is theirs
    )


@pytest.mark.parametrize("fname", PROTO_FILES)
def test_file_headers(our_files, fname):
    ours = our_files[fname]
    theirs = _tc_file_proto(fname)
    assert ours.package == theirs.package == "inference"
    assert ours.syntax == theirs.syntax == "proto3"
    assert list(ours.dependency) == list(theirs.dependency)


@pytest.mark.parametrize("fname", PROTO_FILES)
def test_no_unknown_top_level_types(our_files, fname):
    """Ours may not silently add or drop top-level types in a file."""
    t_msgs, t_enums, t_svcs = _top_level(_tc_file_proto(fname))
    o_msgs, o_enums, o_svcs = _top_level(our_files[fname])
    assert sorted(o_msgs) == sorted(t_msgs)
    assert sorted(o_enums) == sorted(t_enums)
    assert sorted(o_svcs) == sorted(t_svcs)


@pytest.mark.parametrize(
    "fname,msg_name", _all_top_level_messages(), ids=lambda x: str(x)
)
def test_message_structure(our_files, fname, msg_name):
    theirs = {m.name: m for m in _tc_file_proto(fname).message_type}[msg_name]
    ours_by_name = {m.name: m for m in our_files[fname].message_type}
    assert msg_name in ours_by_name, f"missing message inference.{msg_name}"
    errs = _message_diff(f"inference.{msg_name}", theirs, ours_by_name[msg_name])
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("fname,enum_name", _all_top_level_enums(), ids=str)
def test_enum_structure(our_files, fname, enum_name):
    theirs = {e.name: e for e in _tc_file_proto(fname).enum_type}[enum_name]
    ours_by_name = {e.name: e for e in our_files[fname].enum_type}
    assert enum_name in ours_by_name, f"missing enum inference.{enum_name}"
    errs = _enum_diff(f"inference.{enum_name}", theirs, ours_by_name[enum_name])
    assert not errs, "\n".join(errs)


def test_service_method_set(our_pool):
    ours = our_pool.FindServiceByName(f"inference.{SERVICE_NAME}")
    assert [m.name for m in ours.methods] == _tc_methods()


@pytest.mark.parametrize("method", _tc_methods())
def test_service_method(our_pool, method):
    theirs = tc_service_pb2.DESCRIPTOR.services_by_name[SERVICE_NAME].methods_by_name[
        method
    ]
    svc = our_pool.FindServiceByName(f"inference.{SERVICE_NAME}")
    assert method in svc.methods_by_name, f"missing rpc {method}"
    ours = svc.methods_by_name[method]
    assert ours.full_name == theirs.full_name
    assert ours.input_type.full_name == theirs.input_type.full_name
    assert ours.output_type.full_name == theirs.output_type.full_name
    t_proto = descriptor_pb2.MethodDescriptorProto()
    o_proto = descriptor_pb2.MethodDescriptorProto()
    theirs.CopyToProto(t_proto)
    ours.CopyToProto(o_proto)
    assert o_proto.client_streaming == t_proto.client_streaming
    assert o_proto.server_streaming == t_proto.server_streaming


def test_every_tritonclient_type_resolves_in_our_pool(our_pool):
    """Walk tritonclient's descriptors via the live objects, too."""

    def walk(desc):
        ours = our_pool.FindMessageTypeByName(desc.full_name)
        assert ours.full_name == desc.full_name
        for e in desc.enum_types:
            assert our_pool.FindEnumTypeByName(e.full_name).full_name == e.full_name
        for n in desc.nested_types:
            walk(n)

    for fd in TC_FILES.values():
        for m in fd.message_types_by_name.values():
            walk(m)
        for e in fd.enum_types_by_name.values():
            assert our_pool.FindEnumTypeByName(e.full_name).full_name == e.full_name


def test_wire_roundtrip(our_pool):
    """Bytes produced by tritonclient parse identically with our schema."""
    req = tc_service_pb2.ModelInferRequest(model_name="m", model_version="1", id="x")
    req.parameters["sequence_id"].int64_param = 7
    req.parameters["ratio"].double_param = 0.5
    inp = req.inputs.add(name="IN0", datatype="FP32", shape=[1, 2])
    inp.contents.fp32_contents.extend([1.0, 2.0])
    req.outputs.add(name="OUT0").parameters["classification"].int64_param = 3
    req.raw_input_contents.append(b"\x00\x01")

    cfg = tc_model_config_pb2.ModelConfig(name="m", max_batch_size=8)
    cfg.dynamic_batching.priority_queue_policy[1].max_queue_size = 4
    cfg.input.add(name="IN0", data_type=tc_model_config_pb2.TYPE_FP32, dims=[-1])
    cfg.instance_group.add(kind=tc_model_config_pb2.ModelInstanceGroup.KIND_GPU)

    for theirs in (req, cfg, tc_service_pb2.ModelConfigResponse(config=cfg)):
        cls = message_factory.GetMessageClass(
            our_pool.FindMessageTypeByName(theirs.DESCRIPTOR.full_name)
        )
        data = theirs.SerializeToString(deterministic=True)
        ours = cls.FromString(data)
        assert ours.SerializeToString(deterministic=True) == data
        # Every field was understood by our schema (unknown fields would be
        # dropped from the JSON view).
        assert json_format.MessageToDict(ours) == json_format.MessageToDict(theirs)
