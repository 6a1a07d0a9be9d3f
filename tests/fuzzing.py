"""Malformed and hostile ModelInferRequests for tests/test_fuzz.py: valid requests of the example
models, mutated at the field level (the parsed message: names, datatypes, shapes, contents,
parameters, versions, sequence flags; hostile sizes and counts) and at the byte level (the
serialized message: bit flips, cut, inserted, repeated and deleted bytes, a nesting bomb).

A case is plain data — (seed index, field operations, byte operations), each operation a tuple of
small integers — so hypothesis draws it, shrinks it, and prints it when a test fails; `build(case)`
turns it into the bytes sent.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from gateway.protocol import pb

#: Models whose every answer to a request is a status the request explains (no model that fails
#: on purpose, no decoupled model, whose stream answers are not one per request).
MODELS = ("simple_scale", "add_sub", "bytes_reverse", "dtypes", "accumulate_sequence", "mlp", "fixed_cost")
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", "", "FLOAT", "fp32", "BYTES\x00")
TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                "fp32_contents", "fp64_contents", "bytes_contents")
PARAMETER_KEYS = ("timeout", "priority", "sequence_id", "sequence_start", "sequence_end",
                  "triton_enable_empty_final_response", "triton_x", "binary_data_output", "binary_data",
                  "binary_data_size", "classification", "shared_memory_region", "shared_memory_byte_size",
                  "shared_memory_offset", "custom", "", "sequ\x00ence_id")
NAMES = ("INPUT0", "INPUT1", "TEXT", "IN_FP16", "IN_INT64", "IN_BOOL", "INPUT", "OUTPUT0", "OUTPUT1", "nope", "",
         "INPUT0 ", "\u00e9", "x" * 300)
VERSIONS = ("", "1", "2", "0", "-1", "01", " 1", "+1", "1abc", "abc", "99999999999999999999", "1" * 300)
SHAPES = ((), (0,), (1,), (16,), (1, 16), (2, 16), (1, 15), (-1, 16), (1, -1), (0, 16), (65, 16), (1, 16, 1),
          (2**31, 16), (2**40, 2**40), (-(2**63), 1), (1, 1), (1, 3), (64, 16), (1, 2**20))


def _seeds() -> list[pb.ModelInferRequest]:
    seeds = []
    request = pb.ModelInferRequest(model_name="simple_scale", id="s")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[2, 16]).contents.fp32_contents.extend([0.5] * 32)
    request.outputs.add(name="OUTPUT1")
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="bytes_reverse")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(b"\x03\x00\x00\x00abc\x00\x00\x00\x00")
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="bytes_reverse")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="dtypes")
    request.inputs.add(name="IN_FP16", datatype="FP16", shape=[1, 3])
    request.inputs.add(name="IN_INT64", datatype="INT64", shape=[1, 2])
    request.inputs.add(name="IN_BOOL", datatype="BOOL", shape=[1, 1])
    request.raw_input_contents.extend([np.ones(3, np.float16).tobytes(), np.ones(2, np.int64).tobytes(), b"\x01"])
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="accumulate_sequence")
    request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1]).contents.int_contents.append(3)
    request.parameters["sequence_id"].int64_param = 77
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True  # one step: no sequence slot left held
    seeds.append(request)
    request = pb.ModelInferRequest(model_name="mlp", model_version="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[3, 16])
    request.raw_input_contents.append(np.ones((3, 16), np.float32).tobytes())
    request.parameters["timeout"].int64_param = 10_000_000
    request.parameters["priority"].uint64_param = 1
    seeds.append(request)
    return seeds


SEEDS = _seeds()
SEED_BYTES = [seed.SerializeToString() for seed in SEEDS]


def _parameter(target, a: int) -> None:
    kind = a % 6
    if kind == 0:
        target.bool_param = bool(a & 8)
    elif kind == 1:
        target.int64_param = (0, -1, 1, 2**62, -(2**63), 10**6)[a // 6 % 6]
    elif kind == 2:
        target.string_param = ("", "1", "true", "\u00e9\u00e9", "x" * 1000)[a // 6 % 5]
    elif kind == 3:
        target.double_param = (0.0, -1.5, 1e300, float("nan"), float("inf"))[a // 6 % 5]
    elif kind == 4:
        target.uint64_param = (0, 1, 2**64 - 1)[a // 6 % 3]
    else:
        target.CopyFrom(pb.InferParameter())  # no value at all


def _contents(tensor, a: int, b: int) -> None:
    field = TYPED_FIELDS[a % len(TYPED_FIELDS)]
    values = getattr(tensor.contents, field)
    count = b % 70
    if field == "bytes_contents":
        values.extend([bytes(b % 7)] * count)
    elif field == "bool_contents":
        values.extend([bool(b & 1)] * count)
    elif field in ("fp32_contents", "fp64_contents"):
        values.extend([(1.5, float("nan"), -0.0, 3e38)[b % 4]] * count)
    elif field in ("uint_contents", "uint64_contents"):
        values.extend([(0, 7, 2**32 - 1)[b % 3]] * count)
    else:
        values.extend([(-7, 300, -(2**31), 2**31 - 1)[b % 4]] * count)


def apply_field(request: pb.ModelInferRequest, op: tuple[int, int, int]) -> None:
    """One field-level change of `request`, chosen and parametrized by the integers of `op`."""
    kind, a, b = op
    inputs, outputs, raw = request.inputs, request.outputs, request.raw_input_contents
    tensor = inputs[a % len(inputs)] if inputs else None
    kind %= 24
    if kind == 0 and tensor is not None:
        tensor.datatype = DATATYPES[b % len(DATATYPES)]
    elif kind == 1 and tensor is not None:
        del tensor.shape[:]
        tensor.shape.extend(SHAPES[b % len(SHAPES)])
    elif kind == 2 and tensor is not None:
        tensor.name = NAMES[b % len(NAMES)]
    elif kind == 3 and tensor is not None:
        _contents(tensor, a, b)
    elif kind == 4:
        raw.append(bytes(b % 200))
    elif kind == 5 and raw:
        del raw[a % len(raw)]
    elif kind == 6 and raw:
        index = a % len(raw)
        raw[index] = raw[index][: b % (len(raw[index]) + 1)] or b"\xff\xff\xff\xff\x00"
    elif kind == 7:
        _parameter(request.parameters[PARAMETER_KEYS[a % len(PARAMETER_KEYS)]], b)
    elif kind == 8 and tensor is not None:
        _parameter(tensor.parameters[PARAMETER_KEYS[a % len(PARAMETER_KEYS)]], b)
    elif kind == 9:
        outputs.add(name=NAMES[b % len(NAMES)])
    elif kind == 10 and outputs:
        _parameter(outputs[a % len(outputs)].parameters[PARAMETER_KEYS[b % len(PARAMETER_KEYS)]], a)
    elif kind == 11:
        request.model_version = VERSIONS[b % len(VERSIONS)]
    elif kind == 12:
        request.id = ("", "a", "\x00", "z" * 5000)[b % 4]
    elif kind == 13 and tensor is not None:
        inputs.add().CopyFrom(tensor)
    elif kind == 14 and inputs:
        del inputs[a % len(inputs)]
    elif kind == 15:
        request.model_name = MODELS[b % len(MODELS)]
    elif kind == 16 and tensor is not None:
        tensor.ClearField("contents")
    elif kind == 17:
        request.model_name = ("", "nope", "m" * 100_000, "simple_scale/../x", "\u00e9")[b % 5]
    elif kind == 18 and tensor is not None:  # hostile: many inputs
        for _ in range(b % 300):
            inputs.add().CopyFrom(tensor)
    elif kind == 19:  # hostile: many parameters
        for index in range(b % 500):
            request.parameters[f"p{index}"].int64_param = index
    elif kind == 20 and tensor is not None:  # hostile: a huge shape claim, a long one
        del tensor.shape[:]
        tensor.shape.extend([2**20] * (b % 40 + 1))
    elif kind == 21 and tensor is not None:  # hostile: a large BYTES claim
        raw.append((2**31 - 1).to_bytes(4, "little") + b"a" * (b % 64))
    elif kind == 22:
        request.parameters["sequence_id"].string_param = ("", "s", "x" * 10_000)[b % 3]
        request.parameters["sequence_start"].bool_param = bool(a & 1)
    elif kind == 23:
        request.ClearField("inputs" if b & 1 else "raw_input_contents")


def _nesting_bomb(depth: int) -> bytes:
    """An unknown field (number 99) of nested groups `depth` deep: a recursion test for the parser."""
    return b"\x9b\x06" * depth + b"\x9c\x06" * depth


def apply_bytes(data: bytes, op: tuple[int, int, int]) -> bytes:
    """One byte-level change of a serialized message."""
    kind, position, value = op
    value %= 256
    size = len(data)
    at = position % (size + 1)
    kind %= 8
    if kind == 0 and size:  # flip one bit
        at %= size
        return data[:at] + bytes([data[at] ^ (1 << (value % 8))]) + data[at + 1:]
    if kind == 1 and size:  # overwrite one byte
        at %= size
        return data[:at] + bytes([value]) + data[at + 1:]
    if kind == 2:  # insert
        return data[:at] + bytes([value]) * (position % 5 + 1) + data[at:]
    if kind == 3:  # cut here
        return data[:at]
    if kind == 4:  # delete a run
        return data[:at] + data[at + value % 16 + 1:]
    if kind == 5:  # repeat a run (duplicated fields, garbled lengths)
        return data[:at] + data[at:at + value + 1] * 2 + data[at + value + 1:]
    if kind == 6:  # a varint that never ends, or one of 10 bytes
        return data[:at] + b"\xff" * (value % 12 + 1) + data[at:]
    return data + _nesting_bomb(value * 4 + 1)  # up to 1,021 levels


def build(case) -> bytes:
    """The serialized request of a case: (seed index, field ops, byte ops)."""
    seed, field_ops, byte_ops = case
    if field_ops:
        request = pb.ModelInferRequest()
        request.CopyFrom(SEEDS[seed % len(SEEDS)])
        for op in field_ops:
            apply_field(request, op)
        data = request.SerializeToString()
    else:
        data = SEED_BYTES[seed % len(SEEDS)]
    for op in byte_ops:
        data = apply_bytes(data, op)
    return data


_op = st.tuples(st.integers(0, 255), st.integers(0, 2**16), st.integers(0, 2**16))
#: One malformed or hostile request: field-level changes, byte-level changes, or both (never none).
cases = st.tuples(st.integers(0, len(SEEDS) - 1), st.lists(_op, max_size=3), st.lists(_op, max_size=3)).filter(
    lambda case: case[1] or case[2])


def random_case(rng) -> tuple:
    """A case drawn from `rng` (random.Random), as `cases` draws one: the fuzzer's volume source."""
    op = lambda: (rng.randrange(256), rng.randrange(2**16 + 1), rng.randrange(2**16 + 1))  # noqa: E731
    while True:
        case = (rng.randrange(len(SEEDS)), [op() for _ in range(rng.randrange(4))], [op() for _ in range(rng.randrange(4))])
        if case[1] or case[2]:
            return case
