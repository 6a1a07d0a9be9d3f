"""Faults and overload against real Triton servers and the real gateway: a backend killed, a backend
hung (SIGSTOP), 10× overload, too many request bytes. Every figure asserted here is also recorded,
with its conditions, in benchmarks/RESULTS.md ("Resilience")."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.protocol import pb
from gateway.testing import GatewayThread
from gateway.local.triton import find_free_port
from tests.conftest import gateway_on, start_tritons
from tests.servers import sample, scrape
from tests.waiting import wait_until

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture()
def pair(tmp_path):
    servers = start_tritons(2, tmp_path, "resilience")
    yield servers
    for server in servers:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)  # never leave a stopped server behind
        server.stop()


def _seconds_until(predicate, what: str, timeout: float, **options) -> float:
    """Seconds until wait_until(predicate, what, timeout, **options) held, checking every 20 ms; an
    AssertionError if it did not within `timeout`."""
    began = time.monotonic()
    wait_until(predicate, what, timeout, step=0.02, **options)
    return time.monotonic() - began


def _steady_load(address: str, stop: threading.Event, outcomes: list, deadline_s: float = 10.0) -> None:
    """One client in a loop: outcomes get (True or the error, seconds the call took)."""
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    while not stop.is_set():
        began = time.monotonic()
        try:
            result = client.infer("simple_scale", [tensor], client_timeout=deadline_s)
            outcome = bool(result.as_numpy("OUTPUT0")[0, 0] == 2.0)
        except triton_grpc.InferenceServerException as error:
            outcome = error
        outcomes.append((outcome, time.monotonic() - began))
    client.close()


def _backend(gateway: GatewayThread, address: str) -> dict:
    return gateway.snapshot()["backends"][address]


@contextlib.contextmanager
def _steady_load_over(gateway: GatewayThread, pair, clients: int = 4):
    """`clients` clients in a loop (`_steady_load`) for the block, which starts once every backend of
    `pair` has served some; yields their outcomes, every client done and checked when it ends."""
    stop = threading.Event()
    outcomes: list = []
    pool = concurrent.futures.ThreadPoolExecutor(clients)
    workers = [pool.submit(_steady_load, gateway.address, stop, outcomes) for _ in range(clients)]
    try:
        wait_until(lambda: gateway.snapshot()["backends"], "every backend to serve over 20 requests", timeout=20,
                   step=0.02, accept=lambda backends: all(backends[t.grpc_address]["served"] > 20 for t in pair))
        yield outcomes
    finally:
        stop.set()
        pool.shutdown(wait=True)
    for worker in workers:
        worker.result()


def test_sigstopped_backend_is_ejected_its_pending_requests_move_and_it_rejoins(pair):
    hung, other = pair
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [t.grpc_address for t in pair]}},
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
        "outlier": {"stall_after_s": 0.5, "base_ejection_s": 1.0},
    }
    with GatewayThread(config) as gateway:
        with _steady_load_over(gateway, pair) as outcomes:
            os.kill(hung.pid, signal.SIGSTOP)
            out_after = _seconds_until(lambda: _backend(gateway, hung.grpc_address),
                                       "the hung backend to leave rotation", 10, accept=_out_of_rotation)
            assert out_after <= 2.0, (
                f"the hung backend left rotation after {out_after} s; expected within 2 s: {gateway.snapshot()}")
            stopped_outcomes = len(outcomes)
            time.sleep(2.0)
            assert len(outcomes) - stopped_outcomes > 50, "traffic must keep flowing through the other backend"
            os.kill(hung.pid, signal.SIGCONT)
            served = _backend(gateway, hung.grpc_address)["served"]
            wait_until(lambda: _backend(gateway, hung.grpc_address),
                       f"the backend to rejoin after SIGCONT (over {served} + 20 served)", timeout=15, step=0.02,
                       accept=lambda backend: backend["served"] > served + 20)
        failures = [o for o, _ in outcomes if o is not True]
        assert len(failures) <= 0.001 * len(outcomes), f"{len(failures)} of {len(outcomes)} failed: {failures[:3]}"
        slowest = max(seconds for _, seconds in outcomes)
        # A request pending on the hung backend is moved when it leaves rotation (about stall_after_s
        # + a sweep), not left to wait until SIGCONT (over 2 s later) or its 10 s deadline.
        assert slowest < 2.0, f"a request took {slowest:.2f} s: it waited on the hung backend"
        resilience = gateway.snapshot()["resilience"]
        assert resilience["failovers"] >= 1 and resilience["outliers"]["requests_failed_over"] >= 1, resilience
        assert gateway.loop_errors == []


def _out_of_rotation(state: dict) -> bool:
    """A backend's snapshot (_backend) says it is ejected or unhealthy."""
    return state["ejected"] or state["health"] != "healthy"


def test_sigkilled_backend_costs_no_request_and_rejoins_within_5_s_of_its_return(pair):
    dead, _ = pair
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [t.grpc_address for t in pair]}},
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
    }
    with GatewayThread(config) as gateway:
        with _steady_load_over(gateway, pair) as outcomes:
            dead.kill()
            time.sleep(1.5)
            dead.start()  # ready when it returns
            served = _backend(gateway, dead.grpc_address)["served"]
            rejoined = _seconds_until(lambda: _backend(gateway, dead.grpc_address),
                                      f"the backend to rejoin (over {served} served)", 15,
                                      accept=lambda backend: backend["served"] > served)
            assert rejoined <= 5.0, f"rejoined after {rejoined} s; expected within 5 s"
        failures = [o for o, _ in outcomes if o is not True]
        assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:3]}"


# ---- overload ------------------------------------------------------------------------------------

ONE_ROW = pb.ModelInferRequest(model_name="fixed_cost")
_tensor = ONE_ROW.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
ONE_ROW.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
ONE_ROW_BYTES = ONE_ROW.SerializeToString()


async def _closed_loop(address: str, body: bytes, concurrency: int, seconds: float, honour_pushback: bool) -> list:
    """`concurrency` clients, each sending again as soon as it has its answer, for `seconds`:
    (status code, seconds, trailing metadata) of every call."""
    import asyncio

    outcomes: list = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                           ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary(INFER)
        await channel.channel_ready()
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end:
                began = time.monotonic()
                try:
                    await call(body, timeout=10)
                    outcomes.append((grpc.StatusCode.OK, time.monotonic() - began, ()))
                except grpc.aio.AioRpcError as error:
                    trailers = tuple(error.trailing_metadata() or ())
                    outcomes.append((error.code(), time.monotonic() - began, trailers))
                    pushback = dict(trailers).get("grpc-retry-pushback-ms")
                    if honour_pushback and pushback is not None:
                        await asyncio.sleep(int(pushback) / 1e3)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


def _load_from_another_process(address: str, body: bytes, concurrency: int, seconds: float,
                               honour_pushback: bool) -> list:
    """_closed_loop in a process of its own: a client in this process would share the GIL with an
    in-process gateway, and its timings would be the GIL's."""
    import asyncio
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = pool.submit(_run_closed_loop, address, body, concurrency, seconds, honour_pushback).result(120)
    return [(grpc.StatusCode[code], seconds, trailers) for code, seconds, trailers in found]


def _run_closed_loop(address: str, body: bytes, concurrency: int, seconds: float, honour_pushback: bool) -> list:
    import asyncio

    outcomes = asyncio.run(_closed_loop(address, body, concurrency, seconds, honour_pushback))
    return [(code.name, seconds, trailers) for code, seconds, trailers in outcomes]


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q)) if values else float("nan")


@pytest.fixture(scope="module", params=["grpcio-uvloop", "envoy", "h2"])
def engine(request) -> str:
    return request.param


def test_ten_times_overload_is_shed_with_pushback_and_admitted_requests_served(tritons, engine):
    import asyncio

    limit = 8
    metrics_port = find_free_port()
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "batching": {"models": {"fixed_cost": {"enabled": False}}},  # one 2 ms execution per request
        "admission": {"model_default": {"max_inflight": limit}, "retry_pushback_ms": 100},
        "telemetry": {"prometheus_port": metrics_port, "prometheus_host": "127.0.0.1"},
    }
    with gateway_on(engine, config) as gateway:
        outcomes = _load_from_another_process(gateway.address, ONE_ROW_BYTES, 10 * limit, 3.0, honour_pushback=True)
        snapshot = gateway.snapshot()
        metrics = scrape(metrics_port)
    codes = {code for code, _, _ in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    shed = [(seconds, trailers) for code, seconds, trailers in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [seconds for code, seconds, _ in outcomes if code is grpc.StatusCode.OK]
    assert shed and served, (len(shed), len(served))
    assert all(dict(trailers).get("grpc-retry-pushback-ms") == "100" for _, trailers in shed), shed[:3]
    # How fast a refusal comes back is a figure of benchmarks/bench_resilience.py (RESULTS.md), not
    # asserted here: on this shared 2-core machine the client's own queueing dominates it.
    # The latency of admitted requests under this overload is a figure, too (bench_resilience.py).
    print(f"\n{engine}: {len(served)} served (p50 {_quantile(served, 0.5) * 1e3:.1f} ms, p99 "
          f"{_quantile(served, 0.99) * 1e3:.1f} ms), {len(shed)} shed (p50 {_quantile([s for s, _ in shed], 0.5) * 1e3:.2f} ms, "
          f"p99 {_quantile([s for s, _ in shed], 0.99) * 1e3:.2f} ms)")
    models = snapshot["resilience"]["admission"]["models"]
    assert models["fixed_cost"]["shed"] == len(shed) and models["fixed_cost"]["inflight"] == 0, models
    assert sample(metrics, "tensorgate_shed_total", model="fixed_cost") == len(shed)


def test_batching_queue_limit_refuses_under_overload(tritons):
    import asyncio

    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        # Batches of at most 4 rows, 2 ms each, at most 2 in flight: the gateway can pass on ~4,000
        # requests/s, which 512 clients outrun on a quiet machine as on a busy one (with 64-row batches
        # a quiet machine keeps up and there is no overload to shed).
        "batching": {"models": {"fixed_cost": {"max_queue_size": 64, "max_batch_size": 4}}},
    }
    with gateway_on("grpcio-uvloop", config) as gateway:
        outcomes = _load_from_another_process(gateway.address, ONE_ROW_BYTES, 512, 3.0, honour_pushback=False)
        batching = gateway.snapshot()["batching"]
        held = gateway.call(lambda: [q.size for b in gateway.gateway.batching._models.values() if b
                                     for q in b.queues.values()])
    codes = [code for code, _, _ in outcomes]
    full = [trailers for code, _, trailers in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert full, f"512 in flight against max_queue_size 64 refused nothing: {batching}"
    assert all("grpc-retry-pushback-ms" in dict(trailers) for trailers in full)
    (counters,) = [c for name, c in batching.items() if name.startswith("fixed_cost:")]
    assert counters["rejected_queue_full"] == len(full) and counters["held_saturated"] > 0, counters
    assert held == [0], held


def test_hedged_requests_answer_around_a_hung_backend_still_in_rotation(pair):
    """Hedging alone (outlier ejection off, health checks too slow to notice): a request whose
    backend hangs gets its answer from the other backend soon after the model's p95. The hung
    backend is the preferred pool's (placement would otherwise steer requests to whichever backend
    answered faster, and never try the hung one).

    Every request meets the hung backend first here, so every one needs a hedge: the retry budget
    (which hedges are charged to) is set to afford them. With the default budget — 20 % of the
    requests plus 10 a second — the 40 hedges in a fraction of a second outran it now and then, and
    the request it refused waited out its deadline on the hung backend, as designed (outlier
    ejection, off here, is what takes a hung backend out; the budget's bound has its own tests in
    tests/test_resilience_units.py)."""
    hung, other = pair
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"first": {"backends": [hung.grpc_address]}, "second": {"backends": [other.grpc_address]}},
        "models": {"simple_scale": {"pools": ["first", "second"]}},
        "health": {"interval_s": 30, "timeout_s": 5},
        "outlier": {"enabled": False},
        "routing": {"hedge_after_p95": True, "retry_budget_min_per_s": 1000},
    }
    with GatewayThread(config) as gateway:
        client = triton_grpc.InferenceServerClient(gateway.address)
        tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        for _ in range(100):  # the model's p95 is learnt
            client.infer("simple_scale", [tensor], client_timeout=10)
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            took = []
            for _ in range(40):
                began = time.monotonic()
                result = client.infer("simple_scale", [tensor], client_timeout=10)
                took.append(time.monotonic() - began)
                assert result.as_numpy("OUTPUT0")[0, 0] == 2.0
        finally:
            os.kill(hung.pid, signal.SIGCONT)
            client.close()
        snapshot = gateway.snapshot()
    assert snapshot["backends"][hung.grpc_address]["health"] == "healthy"  # still in rotation throughout
    assert snapshot["resilience"]["hedges"] >= 40, snapshot["resilience"]  # one per request after the SIGSTOP
    assert snapshot["resilience"]["retries_refused"] == 0, snapshot["resilience"]
    assert max(took) < 2.0, f"a request waited {max(took):.2f} s on the hung backend"


def _bytes_request(size: int) -> bytes:
    request = pb.ModelInferRequest(model_name="bytes_reverse")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(size.to_bytes(4, "little") + b"x" * size)
    return request.SerializeToString()


def test_request_bytes_held_are_bounded_and_released_on_every_path(tritons, engine):
    """Defect 3: beyond admission.max_request_bytes a request is refused at once (RESOURCE_EXHAUSTED,
    with pushback), the rest are served, and every byte admitted is released afterwards."""
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
        "server": {"max_message_bytes": 8 << 20},
        "admission": {"max_request_bytes": 4 << 20, "retry_pushback_ms": 10},
    }
    body = _bytes_request(1 << 20)
    with gateway_on(engine, config) as gateway:
        outcomes = _load_from_another_process(gateway.address, body, 24, 3.0, honour_pushback=True)
        # The engine releases a call's bytes after its trailers are sent: a client may see its
        # answer first. Wait for the last ones (what the test checks is that they all come back).
        admission = wait_until(lambda: gateway.snapshot()["resilience"]["admission"]["gateway"], "every byte released",
                               timeout=10, accept=lambda admission: admission["held_bytes"] == 0 and admission["inflight"] == 0,
                               raise_on_timeout=False)
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    shed = [trailers for code, _, trailers in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert shed and grpc.StatusCode.OK in codes, (len(shed), len(codes))
    assert all(dict(trailers).get("grpc-retry-pushback-ms") == "10" for trailers in shed)
    assert admission["shed"] == len(shed), admission
    assert admission["held_bytes"] == 0 and admission["inflight"] == 0, admission


def _memory_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


def test_a_large_request_costs_about_its_own_size(tritons):
    """Defect 3: a 48 MiB request whose answer is as large (bytes_reverse) raises the envoy gateway's
    peak memory by about its own size, not several times it. Before, the client's bytes, the parsed
    request, the copies handed upstream, the answer's body, a copy of each output and the parsed
    answer were all held at once: +176 MiB for a 56 MiB request (3.1×); now each goes as soon as the
    next holds its bytes. Measured since: +1.0× to +2.2× (the parsed request is kept for a retry
    while the answer is read and copied into its message). Bound: 3× — the request, its answer and
    one copy on its way; the old path took 4–6× here. (48 MiB: above glibc's
    largest mmap threshold, 32 MiB, every buffer this size is mapped and unmapped on its own, so the
    peak counts only buffers alive at once, not the heap's reuse of smaller ones.)"""
    from gateway.testing import EnvoyGatewayThread

    size = 48 << 20
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [tritons[0].grpc_address]}},
              "server": {"max_message_bytes": 64 << 20}, "upstream": {"max_message_bytes": 64 << 20}}
    body = _bytes_request(size)
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    with EnvoyGatewayThread(config) as gateway, grpc.insecure_channel(gateway.address, options=options) as channel:
        pid = gateway.gateway.engine.pid
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        infer(body, timeout=60)  # warm: connections, buffers and arenas of a first large request
        time.sleep(0.3)
        resting = _memory_kib(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM from here on
        answer = pb.ModelInferResponse.FromString(infer(body, timeout=60))
        peak = _memory_kib(pid, "VmHWM")
    assert answer.raw_output_contents[0][4:] == b"x" * size  # reversed: all x
    grew_mib = (peak - resting) / 1024
    assert grew_mib <= 3 * size / 2**20, f"peak memory grew {grew_mib:.0f} MiB for a {size >> 20} MiB request and its answer"
