"""A backend killed under load: requests keep succeeding through the other; when it returns, it is used again."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.testing import GatewayThread
from tests.conftest import start_tritons
from tests.waiting import wait_until


@pytest.fixture()
def pair(tmp_path):
    servers = start_tritons(2, tmp_path, "failover")
    yield servers
    for server in servers:
        server.stop()


def _load(address: str, stop: threading.Event, outcomes: list) -> None:
    client = triton_grpc.InferenceServerClient(address)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    while not stop.is_set():
        try:
            result = client.infer("simple_scale", [tensor], client_timeout=10)
            outcomes.append(bool(result.as_numpy("OUTPUT0")[0, 0] == 2.0))
        except triton_grpc.InferenceServerException as error:
            outcomes.append(error)
    client.close()


def _served(gateway) -> list[int]:
    return gateway.call(lambda: [b.served for b in gateway.gateway.fleet.backends()])


def test_sigkill_under_load_then_return(pair):
    config = {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [t.grpc_address for t in pair]}},
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
    }
    with GatewayThread(config) as gateway:
        stop = threading.Event()
        outcomes: list = []
        pool = concurrent.futures.ThreadPoolExecutor(4)
        workers = [pool.submit(_load, gateway.address, stop, outcomes) for _ in range(4)]
        try:
            wait_until(lambda: _served(gateway), "every backend to serve over 20 requests", timeout=20, step=0.1,
                       accept=lambda served: all(count > 20 for count in served))

            pair[0].kill()  # SIGKILL, mid-traffic
            killed_at = len(outcomes)
            time.sleep(2.0)
            after_kill = outcomes[killed_at:]
            assert len(after_kill) > 50, "traffic must keep flowing through the survivor"
            failures = [o for o in after_kill if o is not True]
            assert not failures, f"requests failed while one backend was down: {failures[:3]}"

            pair[0].restart()
            before = _served(gateway)[0]
            wait_until(lambda: _served(gateway)[0],
                       f"the returned backend to be used again (over {before} + 20 requests served)",
                       timeout=20, step=0.1, accept=lambda served: served > before + 20)
        finally:
            stop.set()  # the load threads must end even when an assertion failed
            pool.shutdown(wait=True)
        for worker in workers:
            worker.result()
        assert all(o is True for o in outcomes), [o for o in outcomes if o is not True][:3]
        assert gateway.loop_errors == []
