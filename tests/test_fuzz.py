"""A fuzzer through the real gateway: 100,000 malformed and hostile ModelInferRequests, unary and on
ModelStreamInfer streams, against `tensorgate serve` as a real process on each engine.

For each request the gateway must answer (no crash, no hang: every call ends within its deadline,
every stream request gets its answer and the stream ends OK) with a status a client can act on:
never INTERNAL or UNKNOWN (a gateway bug, or a backend error the gateway let through), nor
UNAVAILABLE or CANCELLED (a backend or the gateway broken by the request). Meanwhile good traffic
is served without a failure, and the gateway's memory (RSS) stays flat.

Requests come from tests/fuzzing.py: valid requests of the example models mutated at the field
and at the byte level. Hypothesis draws the seed of each batch of BATCH requests (and, in the
second test, single structured cases, which it shrinks when one fails); Python's `random` expands a
seed into its batch, which keeps the volume affordable (hypothesis spends ~4 ms drawing one case).
The figures of a run are printed (pytest -s) and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.bench.loadgen import MODEL_INFER_METHOD
from gateway.local.triton import find_free_port
from gateway.protocol import pb
from tests.fuzzing import build, cases, random_case
from tests.servers import SteadyLoad

TENSORGATE = [sys.executable, "-m", "gateway"]
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"

#: Two engines: 100,000 in all. TENSORGATE_FUZZ_REQUESTS=N runs N per engine (a longer soak).
REQUESTS_PER_ENGINE = int(os.environ.get("TENSORGATE_FUZZ_REQUESTS", 50_000))
BATCH = 500
STREAM_SHARE = 0.25  # of each batch, sent over streams of STREAM_LENGTH requests
STREAM_LENGTH = 25
TIMEOUT_S = 60.0
#: What a malformed request may be answered with: a status that says what was wrong (or OK, when a
#: mutation left a request that is valid after all).
ACCEPTABLE = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE",
              "FAILED_PRECONDITION", "PERMISSION_DENIED"}
#: An error message on a stream carries no code: these are what an INTERNAL would say there.
INTERNAL_ON_A_STREAM = ("internal gateway error", "attempt to access JSON", "Unable to parse")
RSS_GROWTH_LIMIT_MIB = 64
FLAT_SECOND_HALF_MIB = 8


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


class Fuzzer:
    """An event loop in a thread with one channel to the gateway; `send(payloads)` sends a batch,
    part unary (concurrently), part over streams, and tallies what came back."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.codes: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.unary = self.streamed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._channel = self._run(self._open())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT_S * 4)

    async def _open(self):
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        channel = grpc.aio.insecure_channel(self.address, options=options)
        await asyncio.wait_for(channel.channel_ready(), 30)
        return channel

    def _fail(self, what: str, case) -> None:
        if len(self.failures) < 20:
            self.failures.append(f"{what} for case {case!r}")

    async def _one(self, call, payload: bytes, case, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            try:
                await call(payload, timeout=TIMEOUT_S)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
                if code not in ACCEPTABLE:
                    self._fail(f"{code}: {error.details()[:300]}", case)
        self.codes[code] += 1
        self.unary += 1

    async def _stream(self, items: list) -> None:
        call = self._channel.stream_stream(STREAM_METHOD)(timeout=TIMEOUT_S)
        for payload, _ in items:
            await call.write(payload)
        await call.done_writing()
        answers = 0
        try:
            async for raw in call:
                answers += 1
                answer = pb.ModelStreamInferResponse.FromString(raw)
                text = answer.error_message
                if text and text.startswith(INTERNAL_ON_A_STREAM) or any(m in text for m in INTERNAL_ON_A_STREAM[1:]):
                    self._fail(f"stream answer {text[:300]!r}", [case for _, case in items])
                self.codes["stream error" if text else "stream OK"] += 1
            status = await call.code()
        except grpc.aio.AioRpcError as error:
            status = error.code()
        if status != grpc.StatusCode.OK or answers != len(items):
            self._fail(f"stream ended {status.name} after {answers} of {len(items)} answers",
                       [case for _, case in items])
        self.streamed += len(items)

    async def _batch(self, items: list) -> None:
        call = self._channel.unary_unary(MODEL_INFER_METHOD)
        semaphore = asyncio.Semaphore(64)
        split = int(len(items) * (1 - STREAM_SHARE))
        jobs = [self._one(call, payload, case, semaphore) for payload, case in items[:split]]
        streamed = items[split:]
        jobs += [self._stream(streamed[i:i + STREAM_LENGTH]) for i in range(0, len(streamed), STREAM_LENGTH)]
        await asyncio.gather(*jobs)

    def send(self, items: list) -> None:
        self._run(self._batch(items))

    def close(self) -> None:
        self._run(self._channel.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module", params=["grpcio", "envoy", "h2"])
def served(request, tmp_path_factory, tritons):
    """`tensorgate serve` on one engine: (address, the pid whose memory is the gateway's)."""
    engine = request.param
    port = find_free_port()
    path = tmp_path_factory.mktemp(f"fuzz-{engine}") / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "pools": {"p": {"backends": [tritons[0].grpc_address]}},
        "server": {"engine": engine},
    }))
    process = subprocess.Popen([*TENSORGATE, "serve", "--config", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving on" in process.stdout.readline()
        pid = children(process.pid)[0] if engine == "envoy" else process.pid  # envoy: the Envoy process
        yield engine, f"127.0.0.1:{port}", pid, process
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


@pytest.mark.timeout(1200)
def test_fuzzed_requests_get_a_status_and_never_break_the_gateway(served):
    engine, address, pid, process = served
    fuzzer = Fuzzer(address)
    rss: list[float] = []
    batches = REQUESTS_PER_ENGINE // BATCH
    started = time.monotonic()

    @settings(max_examples=batches, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**64 - 1))
    def fuzz_batch(seed: int) -> None:
        rng = random.Random(seed)
        items = []
        for _ in range(BATCH):
            case = random_case(rng)
            items.append((build(case), case))
        fuzzer.send(items)
        assert process.poll() is None, "the gateway died"
        rss.append(rss_mib(pid))

    try:
        with SteadyLoad(address, workers=4) as good:
            fuzz_batch()
            good.served_more_than(100)
    finally:
        fuzzer.close()
    sent = fuzzer.unary + fuzzer.streamed
    warm = max(rss[: max(1, len(rss) // 10)])  # after a tenth of the run: caches filled, arenas grown
    summary = {
        "engine": engine, "requests": sent, "unary": fuzzer.unary, "on_streams": fuzzer.streamed,
        "seconds": round(time.monotonic() - started, 1), "codes": dict(fuzzer.codes),
        "failures": len(fuzzer.failures), "good_traffic": dict(good.outcome),
        "rss_mib": {"first": round(rss[0], 1), "warm": round(warm, 1), "last": round(rss[-1], 1),
                    "max": round(max(rss), 1), "every_tenth": [round(r) for r in rss[:: max(1, len(rss) // 10)]]},
    }
    print("fuzz summary:", json.dumps(summary))
    assert sent == batches * BATCH
    assert not fuzzer.failures, "\n".join(fuzzer.failures)
    assert set(good.outcome) == {"OK"}, (good.outcome, good.samples)
    assert max(rss) - warm < RSS_GROWTH_LIMIT_MIB, summary
    half = rss[len(rss) // 2]
    assert max(rss[len(rss) // 2:]) - half < FLAT_SECOND_HALF_MIB, summary  # bounded caches are full by then


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=cases)
def test_structured_cases_shrink_to_the_request_that_fails(gateway, case):
    """The same mutations drawn by hypothesis one at a time, so a failure shrinks to a minimal
    request, unary, on the shared gateway (every engine)."""
    with grpc.insecure_channel(gateway.address) as channel:
        try:
            channel.unary_unary(MODEL_INFER_METHOD)(build(case), timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            assert error.code().name in ACCEPTABLE, f"{error.code().name}: {error.details()[:500]}"
