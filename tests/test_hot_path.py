"""The lean hot path's shortcuts give the answers of the plain computations they replace: the batch
queue's tracked deadlines equal a scan of the queue, validation once per request layout raises what
full validation raises, merge and split equal a field-by-field build, and the batching dispatcher
finds every request's queue and answer in-process (stand-in backend, no gRPC)."""

from __future__ import annotations

import asyncio
import random
import struct
from math import prod

import numpy as np
import pytest

from gateway.batching.config import BatchingConfig, BatchingPolicy
from gateway.batching.counters import BatchCounters
from gateway.batching.dispatcher import BatchingDispatcher
from gateway.batching.merge import SCHEDULING_PARAMETERS, merge, split
from gateway.batching.queue import MIN_DEADLINE_MARGIN_S, BatchQueue
from gateway.errors import GatewayError
from gateway.pipeline.core import Pipeline
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.pipeline.layout import ValidatedLayouts, layout_of
from gateway.pipeline.validation import validate_request
from gateway.protocol import pb
from gateway.protocol.tensors import FINAL_FLAG_RESPONSE, ModelSignature, TensorSpec
from gateway.routing.dispatcher import DirectDispatcher
from gateway.routing.router import Router
from gateway.routing.sequences import SequenceTable

# ---- the batch queue's deadlines ---------------------------------------------------------------


def scanned_send_by(queue: BatchQueue) -> float | None:
    """BatchQueue._send_by as it was: a scan of every waiting request."""
    latency_margin = max(2 * queue.backend_latency_s, MIN_DEADLINE_MARGIN_S)
    send_by = None
    for level in queue._levels:
        for pending in level:
            if pending.deadline is None:
                continue
            candidate = pending.deadline - max(latency_margin, 0.1 * (pending.deadline - pending.enqueued))
            if send_by is None or candidate < send_by:
                send_by = candidate
    return send_by


@pytest.mark.parametrize("seed", range(8))
async def test_tracked_send_by_equals_the_scan(seed):
    rng = random.Random(seed)
    now = [1000.0]
    policy = BatchingPolicy(mode="fixed", max_queue_delay_us=10**9, priority_levels=rng.choice([1, 2, 3]))

    async def never_sent(batch):
        raise AssertionError("nothing is due in this test")

    queue = BatchQueue("m", policy, max_rows=10**6, send=never_sent, capacity=lambda: 1,
                       counters=BatchCounters(), clock=lambda: now[0])
    futures = []
    try:
        for _ in range(600):
            action = rng.random()
            if action < 0.6:
                deadline = None if rng.random() < 0.3 else now[0] + rng.choice([0.001, 0.01, 0.5, 30.0]) * rng.random()
                if deadline is not None and deadline - now[0] < queue.backend_latency_s:
                    continue  # put refuses it: tested elsewhere
                futures.append(queue.put(object(), 1, deadline, rng.randrange(policy.priority_levels + 2)))
            elif action < 0.7 and futures:
                rng.choice(futures).cancel()  # its caller went away; it leaves when it reaches a head
            elif action < 0.8:
                queue.backend_latency_s = rng.choice([0.0, 0.0005, 0.003, 0.2])
            elif action < 0.9:
                now[0] += rng.random() * 0.01
            else:
                queue.max_rows = rng.randint(1, 20)  # take a batch of some size, expiring what is overdue
                queue._take(now[0])
                queue.max_rows = 10**6
            assert queue._send_by() == scanned_send_by(queue)
            assert queue._with_deadline == sum(p.deadline is not None for level in queue._levels for p in level)
    finally:
        await queue.close()
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()  # expired ones: retrieved


# ---- validation once per layout ----------------------------------------------------------------

SIGNATURE = ModelSignature(
    "m", "1",
    inputs={
        "A": TensorSpec("A", "FP32", (-1, 4)),
        "T": TensorSpec("T", "BYTES", (-1, 1)),
        "C": TensorSpec("C", "INT64", (-1, 2), optional=True),
    },
    outputs={"Y": TensorSpec("Y", "FP32", (-1, 4)), "Z": TensorSpec("Z", "BYTES", (-1, 1))},
    max_batch_size=8, decoupled=False, sequence=False, sequence_idle_s=None,
)


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def random_request(rng: random.Random) -> pb.ModelInferRequest:
    """A request that is usually valid, with one of many kinds of damage now and then."""
    rows = rng.randint(1, 3)
    request = pb.ModelInferRequest(model_name="m", id=str(rng.random()))
    names = ["A", "T"] + (["C"] if rng.random() < 0.5 else [])
    rng.shuffle(names)
    damage = rng.choice([None] * 8 + ["size", "shape", "dtype", "missing", "unknown", "twice", "corrupt",
                                      "count", "output", "shm", "rows", "buffers"])
    for name in names:
        if damage == "missing" and name == "A":
            continue
        spec = SIGNATURE.inputs[name]
        shape = [rows, spec.shape[1]]
        if damage == "shape" and name == "A":
            shape = [rows, 5]
        if damage == "rows" and name == "A":
            shape = [9, 4]
        datatype = "FP64" if damage == "dtype" and name == "A" else spec.datatype
        tensor = request.inputs.add(name="B" if damage == "unknown" and name == "A" else name, datatype=datatype, shape=shape)
        if damage == "shm" and name == "A":
            tensor.parameters["shared_memory_region"].string_param = "r"
        if spec.datatype == "BYTES":
            elements = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 5))) for _ in range(prod(shape))]
            if damage == "count":
                elements.append(b"x")
            data = _bytes_tensor(elements)
            if damage == "corrupt":
                data += b"\x09\x00\x00\x00ab"
        else:
            data = bytes(prod(shape) * (8 if spec.datatype == "INT64" else 4))
            if damage == "size" and name == "A":
                data += b"\x00"
        request.raw_input_contents.append(data)
        if damage == "twice" and name == "A":
            request.inputs.add(name="A", datatype="FP32", shape=[rows, 4])
            request.raw_input_contents.append(bytes(rows * 16))
    if damage == "buffers":
        request.raw_input_contents.append(b"")
    for output in rng.sample(["Y", "Z"], rng.randint(0, 2)):
        request.outputs.add(name=output)
    if damage == "output":
        request.outputs.add(name="W")
    return request


def outcome(check, request) -> tuple:
    try:
        check(request)
    except GatewayError as error:
        return type(error), error.message
    return None, None


def test_validation_once_per_layout_raises_what_full_validation_raises():
    rng = random.Random(7)
    layouts = ValidatedLayouts(SIGNATURE)
    seen_passing = 0
    for _ in range(3000):
        request = random_request(rng)
        expected = outcome(lambda r: validate_request(r, SIGNATURE), request)
        assert outcome(layouts.validate, request) == expected, request
        seen_passing += expected == (None, None)
    assert seen_passing > 1000
    assert 0 < len(layouts) < seen_passing  # layouts were remembered, and they repeat


def test_a_remembered_layout_still_checks_each_requests_buffers():
    layouts = ValidatedLayouts(SIGNATURE)
    good = pb.ModelInferRequest(model_name="m")
    good.inputs.add(name="A", datatype="FP32", shape=[1, 4])
    good.inputs.add(name="T", datatype="BYTES", shape=[1, 1])
    good.raw_input_contents.extend([bytes(16), _bytes_tensor([b"ok"])])
    assert layouts.validate(good) == layout_of(good)
    short, corrupt = pb.ModelInferRequest(), pb.ModelInferRequest()
    short.CopyFrom(good)
    short.raw_input_contents[0] = bytes(12)
    corrupt.CopyFrom(good)
    corrupt.raw_input_contents[1] = _bytes_tensor([b"a", b"b"])
    assert layout_of(short) == layout_of(corrupt) == layout_of(good)
    for bad in (short, corrupt):
        assert outcome(layouts.validate, bad) == outcome(lambda r: validate_request(r, SIGNATURE), bad) != (None, None)


def test_typed_contents_have_no_layout_and_are_validated_in_full():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="A", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3])
    request.inputs.add(name="T", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"x")
    assert layout_of(request) is None
    layouts = ValidatedLayouts(SIGNATURE)
    assert outcome(layouts.validate, request) == outcome(lambda r: validate_request(r, SIGNATURE), request) != (None, None)
    assert len(layouts) == 0


# ---- merge and split ---------------------------------------------------------------------------


def merge_field_by_field(requests, rows):
    """merge as it was first written: the batch request built field by field."""
    first = requests[0]
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    for name_order, tensor in enumerate(first.inputs):
        parts = [r.raw_input_contents[[t.name for t in r.inputs].index(tensor.name)] for r in requests]
        out = merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[sum(rows), *tensor.shape[1:]])
        for key, value in tensor.parameters.items():
            out.parameters[key].CopyFrom(value)
        merged.raw_input_contents.append(b"".join(parts))
    merged.outputs.extend(first.outputs)
    for key, value in first.parameters.items():
        if key not in SCHEDULING_PARAMETERS:
            merged.parameters[key].CopyFrom(value)
    return merged


def split_field_by_field(response, rows):
    """split as it was first written: each response built field by field."""
    singles = []
    offsets = {}
    for index, count in enumerate(rows):
        single = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        for key, value in response.parameters.items():
            single.parameters[key].CopyFrom(value)
        for position, (tensor, raw) in enumerate(zip(response.outputs, response.raw_output_contents)):
            out = single.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[count, *tensor.shape[1:]])
            for key, value in tensor.parameters.items():
                out.parameters[key].CopyFrom(value)
            start = offsets.get(position, 0)
            if tensor.datatype == "BYTES":
                end = start
                for _ in range(count * prod(tensor.shape[1:])):
                    end += 4 + struct.unpack_from("<I", raw, end)[0]
            else:
                end = start + count * prod(tensor.shape[1:]) * 4
            offsets[position] = end
            single.raw_output_contents.append(raw[start:end])
        singles.append(single)
    return singles


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_the_field_by_field_build(seed):
    rng = random.Random(seed)
    for _ in range(60):
        names = [f"I{i}" for i in range(rng.randint(1, 3))]
        widths = {name: rng.randint(0, 6) for name in names}
        tensor_parameter = {name: rng.random() < 0.3 for name in names}
        parameters = {key: rng.randint(1, 9) for key in ("priority", "timeout", "custom") if rng.random() < 0.4}
        outputs = [f"O{i}" for i in range(rng.randint(0, 2))]
        requests, rows = [], []
        for index in range(rng.randint(1, 6)):
            count = rng.randint(1, 4)
            rows.append(count)
            request = pb.ModelInferRequest(model_name="m", model_version="1" if index == 0 else "", id=f"r{index}")
            for name in rng.sample(names, len(names)):  # inputs in any order
                tensor = request.inputs.add(name=name, datatype="FP32", shape=[count, widths[name]])
                if tensor_parameter[name]:
                    tensor.parameters["p"].string_param = "x"
                request.raw_input_contents.append(bytes(rng.randrange(256) for _ in range(count * widths[name] * 4)))
            for name in outputs:
                request.outputs.add(name=name)
            for key, value in parameters.items():
                request.parameters[key].int64_param = value
            requests.append(request)
        assert merge(requests, rows) == merge_field_by_field(requests, rows)


@pytest.mark.parametrize("copied_skeleton", [True, False], ids=["skeleton copied", "skeleton built"])
@pytest.mark.parametrize("seed", range(6))
def test_split_equals_the_field_by_field_build(seed, copied_skeleton, monkeypatch):
    import gateway.batching.merge

    monkeypatch.setattr(gateway.batching.merge, "COPY_SKELETON_BELOW", 1 << 40 if copied_skeleton else 0)
    rng = random.Random(seed)
    for _ in range(60):
        rows = [rng.randint(1, 4) for _ in range(rng.randint(1, 8))]
        total = sum(rows)
        response = pb.ModelInferResponse(model_name="m", model_version="1", id="batch")
        if rng.random() < 0.5:
            response.parameters[FINAL_FLAG_RESPONSE].bool_param = True
        for index in range(rng.randint(1, 3)):
            if rng.random() < 0.4:  # BYTES: element lengths of every size, 1- and 2-byte varints
                elements = [bytes(rng.randint(0, 200)) for _ in range(total * 2)]
                out = response.outputs.add(name=f"O{index}", datatype="BYTES", shape=[total, 2])
                response.raw_output_contents.append(_bytes_tensor(elements))
            else:
                width = rng.randint(0, 50)
                out = response.outputs.add(name=f"O{index}", datatype="FP32", shape=[total, width])
                response.raw_output_contents.append(bytes(rng.randrange(256) for _ in range(total * width * 4)))
            if rng.random() < 0.3:
                out.parameters["q"].int64_param = 3
        assert split(response, rows, "b") == split_field_by_field(response, rows)


# ---- the batching dispatcher in-process --------------------------------------------------------


class EchoBackend:
    """Answers on the next loop turn with the request's rows (as Backend.infer: the stream owns the id)."""

    address, pool, healthy, routable, outstanding = "echo:1", "cpu", True, True, 0

    def __init__(self) -> None:
        self.batches: list[int] = []

    def serves(self, model: str, version: str) -> bool:
        return True

    async def infer(self, request):
        request.id = "stream-id"
        rows = request.inputs[0].shape[0]
        self.batches.append(rows)
        await asyncio.sleep(0)
        response = pb.ModelInferResponse(model_name="m", model_version="1", id=request.id)
        response.outputs.add(name="Y", datatype="FP32", shape=[rows, 4])
        response.raw_output_contents.append(request.raw_input_contents[0])
        response.parameters[FINAL_FLAG_RESPONSE].bool_param = True
        return response


class Fleet:
    def __init__(self, backend) -> None:
        self.pools = {"cpu": [backend]}

    def on_change(self, listener) -> None:
        pass


class Catalog:
    def __init__(self) -> None:
        self.fetched = 0

    async def get(self, model: str, version: str):
        self.fetched += 1

        class Info:
            signature = ModelSignature("m", "1", {"A": TensorSpec("A", "FP32", (-1, 4))},
                                       {"Y": TensorSpec("Y", "FP32", (-1, 4))}, 8, False, False, None)

        return Info()


def a_request(value: float, kind: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id=f"client-{value}")
    tensor = request.inputs.add(name="A", datatype="FP32", shape=[1, 4])
    if kind == "typed":
        tensor.contents.fp32_contents.extend([value] * 4)
    else:
        request.raw_input_contents.append(np.full(4, value, np.float32).tobytes())
    if kind == "priority":
        request.parameters["priority"].int64_param = 1
    return request


async def test_batched_requests_each_get_their_own_rows_back():
    backend = EchoBackend()
    router = Router(Fleet(backend), None)
    batching = BatchingDispatcher(DirectDispatcher(router, SequenceTable()), BatchingConfig(), router)
    catalog = Catalog()
    pipeline = Pipeline(catalog, router.routes, batching)
    kinds = ["raw", "typed", "priority"]
    for _ in range(3):
        requests = [a_request(float(i), kinds[i % 3]) for i in range(20)]
        responses = await asyncio.gather(*(pipeline.infer(r, deadline=None) for r in requests))
        for i, response in enumerate(responses):
            assert response.id == f"client-{float(i)}"
            assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [float(i)] * 4
            assert list(response.outputs[0].shape) == [1, 4]
            assert FINAL_FLAG_RESPONSE not in response.parameters
    assert catalog.fetched == 1, "the unversioned name is resolved once, then looked up"
    (model,) = batching._models.values()
    assert len(model.queues) == 1, "raw, typed and prioritized requests of one signature share a queue"
    assert max(backend.batches) > 1
    counters = batching.batch_counters("m", "1")
    assert counters.requests == 60 and counters.rows == sum(backend.batches)
    exchange = Exchange(pipeline._known_entry(requests[0]), requests[0], 0)
    assert exchange.layout is None  # set by the pipeline only, after validation
    await batching.close()


async def test_an_entry_validates_through_its_own_layouts():
    entry = ModelEntry("m", "1", SIGNATURE)
    request = random_request(random.Random(1))
    while outcome(lambda r: validate_request(r, SIGNATURE), request) != (None, None):
        request = random_request(random.Random())
    assert entry.layouts.validate(request) == layout_of(request)
    assert len(entry.layouts) == 1
