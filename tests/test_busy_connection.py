"""One busy connection: thousands of concurrent calls on one channel, the normal tritonclient
pattern, all answered.

grpc core's server queues calls it has received until grpc.aio takes them (one at a time); past
1,000 queued its default drops them at random, as CANCELLED — a status clients do not retry, that
the gateway never sees. Triton's own server answered all of the same burst; so must the gateway,
on both engines (ServerConfig.max_pending_calls).
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest

from gateway.bench.loadgen import MODEL_INFER_METHOD, build_infer_request

CALLS = 2000


async def burst(target: str, calls: int) -> collections.Counter:
    payload = build_infer_request("simple_scale")
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(MODEL_INFER_METHOD)

        async def one() -> str:
            try:
                await call(payload, timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"

        return collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))


@pytest.mark.timeout(600)
def test_thousands_of_concurrent_calls_on_one_channel_all_succeed(gateway, triton):
    direct = asyncio.run(burst(triton.grpc_address, CALLS))
    assert direct == {"OK": CALLS}, f"Triton itself did not answer the burst: {direct}"
    for attempt in range(2):  # twice: the second burst meets warm connections and a warm pool
        outcome = asyncio.run(burst(gateway.address, CALLS))
        assert outcome == {"OK": CALLS}, f"burst {attempt + 1} through the gateway: {outcome}"
