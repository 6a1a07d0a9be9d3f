"""Batching promises of the README through the real gateway: adaptive batching (the default) forms
multi-row batches under load, and `preferred_batch_sizes` sends a batch as soon as it reaches one."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio

from gateway.testing import GatewayThread
from tests.waiting import wait_until, wait_until_async


def _inputs(value: float, rows: int = 1):
    tensor = triton_grpc.InferInput("INPUT0", [rows, 16], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 16), value, np.float32))
    return [tensor]


def _triton_counts(triton, model: str) -> tuple[int, int]:
    """Triton's own (rows inferred, executions) of the model: its view of the batches it ran."""
    client = triton_grpc.InferenceServerClient(triton.grpc_address)
    try:
        stats = client.get_inference_statistics(model).model_stats
        return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)
    finally:
        client.close()


def test_adaptive_batching_gathers_requests_while_the_backend_is_busy(triton):
    """The default config (adaptive, max_queue_delay_us 500). The backend is made busy for as long
    as the test needs: a proxy in front of Triton holds the first request's batch in flight while
    32 more arrive. They wait — the backend has no room — and leave together as one batch. A queue
    that sends whatever waited 500 µs whatever is in flight (the regression fixed earlier, batches
    of ~1.2 rows under load), or one request at a time, sends many batches instead."""
    from tests.servers import UpstreamProxy

    proxy = UpstreamProxy(triton.grpc_address)
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [proxy.address]}},
              "upstream": {"transport": "grpc-stream"}}  # the proxy speaks gRPC
    try:
        with GatewayThread(config) as gateway:
            policy = gateway.gateway.config.batching.policy_for("fixed_cost")
            assert (policy.mode, policy.max_queue_delay_us) == ("adaptive", 500)  # the defaults

            async def scenario() -> list:
                client = triton_aio.InferenceServerClient(gateway.address)
                try:
                    # Learn a slow backend: three batches held ~0.3 s each (the wait cap follows the
                    # observed latency: twice it, here ~0.3 s, far more than the arrivals take).
                    for step in range(3):
                        proxy.hold()
                        call = asyncio.ensure_future(client.infer("fixed_cost", _inputs(step), client_timeout=30))
                        await wait_until_async(lambda: proxy.held == 1, f"batch {step} held at the proxy", step=0.005)
                        await asyncio.sleep(0.3)
                        proxy.release()
                        await call
                    before = _batching(gateway)
                    proxy.hold()
                    first = asyncio.ensure_future(client.infer("fixed_cost", _inputs(100.0), client_timeout=30))
                    await wait_until_async(lambda: proxy.held == 1, "the first request held at the proxy", step=0.005)
                    rest = [asyncio.ensure_future(client.infer("fixed_cost", _inputs(float(i)), client_timeout=30))
                            for i in range(32)]
                    # All 33 reached the gateway: waiting in its queue, or sent (and held at the proxy).
                    await wait_until_async(lambda: _arrived(_batching(gateway), before), "all 33 requests at the gateway",
                                           step=0.005, accept=lambda arrived: arrived == 33)
                    proxy.release()
                    results = await asyncio.gather(first, *rest)
                    return before, results
                finally:
                    proxy.release()
                    await client.close()

            rows_before, executions_before = _triton_counts(triton, "fixed_cost")
            before, results = asyncio.run(scenario())
            # Triton's Python backend counts an execution after its responses are sent: a client can
            # hold every answer before Triton counts the last batch. Wait for its rows (or 10 s).
            rows_after, executions_after = wait_until(
                lambda: _triton_counts(triton, "fixed_cost"), "Triton to count the 36 rows", 10,
                accept=lambda counts: counts[0] >= rows_before + 3 + 33, raise_on_timeout=False)
            after = _batching(gateway)
            assert not gateway.loop_errors
    finally:
        proxy.close()
    assert np.all(results[0].as_numpy("OUTPUT0") == 100.0)
    for i, result in enumerate(results[1:]):
        assert np.all(result.as_numpy("OUTPUT0") == float(i))
    sizes = {rows: count - before["batch_sizes"].get(rows, 0) for rows, count in after["batch_sizes"].items()}
    sizes = {rows: count for rows, count in sizes.items() if count}
    # The first request alone, then the 32 that gathered behind it — in one batch, or two should
    # the wait cap (~0.3 s) pass before the last of them arrived on a very busy machine.
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 33
    assert batches <= 3 and max(sizes) >= 16, sizes
    # Triton executed exactly those batches (3 warm-up batches and these).
    assert (rows_after - rows_before, executions_after - executions_before) == (3 + 33, 3 + batches)


def _arrived(now: dict, before: dict) -> int:
    """Requests admitted since `before`: sent in batches, or waiting in the queue."""
    return now["requests"] - before["requests"] + now["waiting"]


def _batching(gateway: GatewayThread) -> dict:
    return gateway.snapshot()["batching"]["fixed_cost:1"]


def test_preferred_batch_size_sends_the_batch_at_once(triton):
    """Fixed mode with a 10 s window: batches of 4 rows (a preferred size) leave at once, without
    waiting out the window; 4 requests of 1 row or 2 of 2 rows alike."""
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [triton.grpc_address]}},
        "batching": {"models": {"simple_scale": {"mode": "fixed", "max_queue_delay_us": 10_000_000,
                                                 "preferred_batch_sizes": [4]}}},
    }

    async def burst(address: str, shapes: list[int]) -> float:
        client = triton_aio.InferenceServerClient(address)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(client.infer("simple_scale", _inputs(float(i), rows), client_timeout=30)
                                             for i, rows in enumerate(shapes)))
            elapsed = time.monotonic() - started
            for i, (rows, result) in enumerate(zip(shapes, results)):
                assert np.all(result.as_numpy("OUTPUT0") == np.full((rows, 16), 2.0 * i, np.float32))
            return elapsed
        finally:
            await client.close()

    with GatewayThread(config) as gateway:
        elapsed = [asyncio.run(burst(gateway.address, shapes)) for shapes in ([1] * 8, [2, 2], [1, 2, 1])]
        stats = gateway.snapshot()["batching"]["simple_scale:1"]
        assert not gateway.loop_errors
    assert stats["reasons"] == {"preferred": 4}, stats
    assert stats["batch_sizes"] == {4: 4}, stats
    assert max(elapsed) < 5.0, elapsed  # half the window: no batch waited it out
