"""Gateway-side dynamic batching against real Tritons: equivalence, isolation, shedding, deadlines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.testing import GatewayThread
from tests.waiting import wait_until, wait_until_async


def batching_gateway(tritons, loop_kind: str = "uvloop", **batching) -> GatewayThread:
    return GatewayThread({
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "batching": batching,
    }, use_uvloop=loop_kind == "uvloop")


@pytest.fixture(scope="module")
def fixed_window(tritons, event_loop_kind):
    """Batching in fixed mode with a long window, so concurrent requests surely share batches."""
    with batching_gateway(tritons, event_loop_kind, default={"mode": "fixed", "max_queue_delay_us": 20_000}) as gateway:
        yield gateway


def _tensor(name, array, datatype):
    item = triton_grpc.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def _request_inputs(model: str, rows: int, seed: int):
    rng = np.random.default_rng(seed)
    if model == "simple_scale":
        return [_tensor("INPUT0", rng.standard_normal((rows, 16)).astype(np.float32), "FP32")]
    if model == "add_sub":
        return [
            _tensor("INPUT0", rng.standard_normal((rows, 16)).astype(np.float32), "FP32"),
            _tensor("INPUT1", rng.standard_normal((rows, 16)).astype(np.float32), "FP32"),
        ]
    if model == "bytes_reverse":
        words = [bytes(rng.integers(0, 256, int(rng.integers(0, 12))).astype(np.uint8)) for _ in range(rows)]
        return [_tensor("TEXT", np.array(words, dtype=np.object_).reshape(rows, 1), "BYTES")]
    if model == "dtypes":
        width = int(rng.integers(1, 4))  # same non-batch dims within one request; varies across requests
        return [
            _tensor("IN_FP16", rng.standard_normal((rows, width)).astype(np.float16), "FP16"),
            _tensor("IN_INT64", rng.integers(-1000, 1000, (rows, width)), "INT64"),
            _tensor("IN_BOOL", rng.integers(0, 2, (rows, width)).astype(bool), "BOOL"),
        ]
    raise KeyError(model)


async def _infer_all(address: str, cases) -> list:
    """Send every (model, rows, seed) case concurrently from several clients; results in order."""
    clients = [triton_aio.InferenceServerClient(address) for _ in range(4)]
    try:
        calls = [
            clients[i % len(clients)].infer(model, _request_inputs(model, rows, seed), request_id=f"r{i}")
            for i, (model, rows, seed) in enumerate(cases)
        ]
        return await asyncio.gather(*calls)
    finally:
        for client in clients:
            await client.close()


def _outputs(result) -> dict:
    response = result.get_response()
    return {o.name: (o.datatype, list(o.shape), result.as_numpy(o.name)) for o in response.outputs}


cases_strategy = st.lists(
    st.tuples(
        st.sampled_from(["simple_scale", "add_sub", "bytes_reverse", "dtypes"]),
        st.integers(min_value=1, max_value=9),
        st.integers(min_value=0, max_value=2**31),
    ),
    min_size=2,
    max_size=40,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=cases_strategy)
def test_batched_outputs_equal_each_request_sent_alone(triton, fixed_window, cases):
    through = asyncio.run(_infer_all(fixed_window.address, cases))
    direct = asyncio.run(_infer_all(triton.grpc_address, cases))
    for i, (a, b) in enumerate(zip(direct, through)):
        assert b.get_response().id == f"r{i}"
        expected, actual = _outputs(a), _outputs(b)
        assert actual.keys() == expected.keys()
        for name, (datatype, shape, values) in expected.items():
            assert actual[name][:2] == (datatype, shape)
            np.testing.assert_array_equal(actual[name][2], values)


def test_concurrent_requests_really_share_batches(fixed_window):
    cases = [("simple_scale", 2, seed) for seed in range(24)]
    asyncio.run(_infer_all(fixed_window.address, cases))
    stats = fixed_window.call(fixed_window.gateway.snapshot)["batching"]["simple_scale:1"]
    assert stats["batches"] < stats["requests"], stats
    assert max(stats["batch_sizes"]) > 2, stats


def test_malformed_request_rejected_alone(fixed_window):
    async def scenario():
        client = triton_aio.InferenceServerClient(fixed_window.address)
        good = [client.infer("simple_scale", _request_inputs("simple_scale", 1, s)) for s in range(6)]
        bad_tensor = _tensor("INPUT0", np.ones((1, 15), np.float32), "FP32")
        bad = client.infer("simple_scale", [bad_tensor])
        results = await asyncio.gather(*good[:3], bad, *good[3:], return_exceptions=True)
        await client.close()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[3], triton_grpc.InferenceServerException)
    assert results[3].status() == "StatusCode.INVALID_ARGUMENT"
    for seed, result in enumerate(results[:3] + results[4:]):
        assert not isinstance(result, Exception), result
        sent = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), sent * 2)


def test_backend_failure_fails_only_its_batch(tritons, event_loop_kind):
    """A batch whose model raises fails with the backend's status; a later batch succeeds.

    Batches leave only full (four rows; the window is far longer than the test), so each group of
    four is one batch however the requests straggle in on a busy machine."""
    with batching_gateway(tritons, event_loop_kind,
                          default={"mode": "fixed", "max_queue_delay_us": 30_000_000, "max_batch_size": 4}) as gateway:
        def request(mode):
            return [
                _tensor("INPUT0", np.ones((1, 16), np.float32), "FP32"),
                _tensor("MODE", np.array([[mode]], np.int32), "INT32"),
            ]

        async def scenario():
            client = triton_aio.InferenceServerClient(gateway.address)
            failing = await asyncio.gather(
                *(client.infer("fail_on_demand", request(3 if i == 0 else 0)) for i in range(4)),
                return_exceptions=True,
            )
            later = await asyncio.gather(*(client.infer("fail_on_demand", request(0)) for _ in range(4)))
            await client.close()
            return failing, later

        failing, later = asyncio.run(scenario())
        stats = gateway.call(gateway.gateway.snapshot)["batching"]["fail_on_demand:1"]
        assert stats["batch_sizes"].get(4) == 2, stats  # both groups of four were one batch each
        for error in failing:
            assert isinstance(error, triton_grpc.InferenceServerException)
            assert error.status() == "StatusCode.INTERNAL"
            assert "fail_on_demand" in error.message()
        assert all(r.as_numpy("OUTPUT0").shape == (1, 16) for r in later)


def test_queue_full_is_refused_at_once(tritons, event_loop_kind):
    window_s = 2.0
    with batching_gateway(tritons, event_loop_kind,
                          default={"mode": "fixed", "max_queue_delay_us": int(window_s * 1e6), "max_queue_size": 2}) as gateway:
        def queued() -> int:
            return gateway.call(gateway.gateway.snapshot)["batching"].get("simple_scale:1", {}).get("waiting", 0)

        async def scenario():
            client = triton_aio.InferenceServerClient(gateway.address)
            waiting = [asyncio.ensure_future(client.infer("simple_scale", _request_inputs("simple_scale", 1, i))) for i in range(2)]
            await wait_until_async(lambda: queued() == 2, "both requests queued", timeout=window_s / 2)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(triton_grpc.InferenceServerException) as error:
                await client.infer("simple_scale", _request_inputs("simple_scale", 1, 9))
            refused_after = loop.time() - started
            results = await asyncio.gather(*waiting)
            await client.close()
            return error.value, refused_after, results

        error, refused_after, results = asyncio.run(scenario())
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in error.message()
        assert refused_after < 0.1, "a full queue must refuse at once, not after the window"
        assert len(results) == 2


def test_unmeetable_deadline_is_not_sent(tritons, event_loop_kind):
    """A request with less time left than its backend takes is refused without a backend call.

    slow_on_demand is made to take 300 ms per call and the client allows 100 ms: the request
    reaches the queue with time left (a busy machine may take tens of ms to hand it over; with
    only a few ms, the deadline sometimes passed before the queue saw it), and far less time than
    the backend takes. Which side ends the call first (the gateway's refusal or the client's own
    timer) is a race on a busy machine; the refusal counter says the gateway refused it."""
    delay_file = Path(tritons[0].env["TENSORGATE_DELAY_FILE"])
    delay_file.write_text("300")
    try:
        with batching_gateway(tritons, event_loop_kind) as gateway:
            client = triton_grpc.InferenceServerClient(gateway.address)
            inputs = [_tensor("INPUT0", np.ones((1, 16), np.float32), "FP32")]
            for _ in range(10):  # learn the backend latency
                client.infer("slow_on_demand", inputs)
            served = gateway.call(lambda: sum(b.served for b in gateway.gateway.fleet.backends()))
            with pytest.raises(triton_grpc.InferenceServerException) as error:
                client.infer("slow_on_demand", inputs, client_timeout=0.1)
            stats = gateway.call(gateway.gateway.snapshot)
    finally:
        delay_file.unlink()
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert stats["batching"]["slow_on_demand:1"]["rejected_deadline"] == 1, stats["batching"]
    assert sum(b["served"] for b in stats["backends"].values()) == served, \
        f"the request must not be sent: {error.value.message()!r}; {stats}"


def test_deadline_sends_a_batch_early(tritons, event_loop_kind):
    """A request whose deadline ends before the window closes is sent early (reason: deadline)."""
    # The request leaves a tenth of its 1 s before its deadline (100 ms for the backend's answer).
    with batching_gateway(tritons, event_loop_kind, default={"mode": "fixed", "max_queue_delay_us": 2_000_000}) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        inputs = _request_inputs("simple_scale", 1, 0)
        client.infer("simple_scale", inputs)  # waits out the window; the queue learns the latency
        result = client.infer("simple_scale", inputs, client_timeout=1.0)
        assert result.as_numpy("OUTPUT0").shape == (1, 16)
        stats = gateway.call(gateway.gateway.snapshot)["batching"]["simple_scale:1"]
        assert stats["reasons"] == {"delay": 1, "deadline": 1}
        assert stats["max_queue_delay_us"] < 2_000_000 + 50_000


def test_unbatchable_models_pass_straight_through(gateway):
    client = triton_grpc.InferenceServerClient(gateway.address)
    result = client.infer(
        "accumulate_sequence", [_tensor("INPUT", np.array([[5]], np.int32), "INT32")],
        sequence_id=777, sequence_start=True, sequence_end=True,
    )
    assert int(result.as_numpy("OUTPUT")[0, 0]) == 5
    batching = gateway.snapshot()["batching"]
    assert "accumulate_sequence:1" not in batching


async def test_priority_levels_fill_batches_first():
    """Unit test of the queue alone (a recording `send` stands in for the backend)."""
    from gateway.batching.config import BatchingPolicy
    from gateway.batching.queue import BatchQueue
    from gateway.batching.counters import BatchCounters

    sent: list[list[str]] = []

    async def send(batch):
        sent.append([p.item for p in batch])
        for p in batch:
            p.future.set_result(p.item)

    policy = BatchingPolicy(mode="fixed", max_queue_delay_us=30_000, priority_levels=2)
    queue = BatchQueue("m", policy, max_rows=4, send=send, capacity=lambda: 1, counters=BatchCounters())
    first_low = queue.put("low-a", 2, None, 2)
    default_low = queue.put("low-b", 1, None, 0)  # no priority: the default, lowest level
    high = queue.put("high-a", 2, None, 1)  # 5 rows wait for 4 slots: a full batch leaves
    await asyncio.gather(first_low, default_low, high)
    # The high-priority request takes its place first although it came last; the low ones fill
    # the rest in arrival order, and what does not fit waits for the window.
    assert sent == [["high-a", "low-a"], ["low-b"]]
    assert queue.counters.reasons == {"full": 1, "delay": 1}


def test_model_statistics_show_the_gateways_batches(tmp_path):
    from tests.conftest import start_tritons

    (own_triton,) = start_tritons(1, tmp_path, "stats")  # no other traffic reaches this backend
    try:
        with batching_gateway([own_triton], default={"mode": "fixed", "max_queue_delay_us": 20_000}) as gateway:
            asyncio.run(_infer_all(gateway.address, [("add_sub", 1, seed) for seed in range(12)]))
            own = gateway.call(gateway.gateway.snapshot)["batching"]["add_sub:1"]
            # Triton's Python backend reports an execution after its responses are sent: on a busy
            # machine a client can have every answer before Triton counts the batch. Wait for
            # Triton's own count to reach the gateway's batches (or 10 s) before reading.
            direct = triton_grpc.InferenceServerClient(own_triton.grpc_address)
            wait_until(lambda: direct.get_inference_statistics("add_sub").model_stats[0].execution_count,
                       f"Triton to count the gateway's {own['batches']} batches", 10,
                       accept=lambda executions: executions >= own["batches"], raise_on_timeout=False)
            client = triton_grpc.InferenceServerClient(gateway.address)
            stats = client.get_inference_statistics("add_sub").model_stats[0]
    finally:
        own_triton.kill()
    assert stats.inference_count == own["requests"] == 12
    assert stats.inference_stats.queue.count >= 12  # the gateway's queue is counted
    # The backend saw the gateway's batches: fewer executions than requests, batches above one row.
    assert stats.execution_count == own["batches"] < 12
    assert max(b.batch_size for b in stats.batch_stats) > 1
