"""server.cpus: a serving process, its threads and its Envoy on the CPUs it was given (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.bench.cpu import descendants
from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.local.triton import find_free_port
from gateway.server.cpu_pinning import cpus_for
from gateway.testing import WorkersProcess
from tests.waiting import wait_until

AVAILABLE = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(AVAILABLE) < 2, reason="pinning to one CPU of several needs two CPUs")


def test_a_single_process_gets_the_whole_list_and_worker_k_gets_one_cpu():
    assert cpus_for((3, 1), None) == {1, 3}
    assert [cpus_for((3, 1), worker) for worker in range(3)] == [{3}, {1}, {3}]


@pytest.mark.parametrize(("cpus", "wrong"), [([], "[]"), ([0, 0], "[0, 0]"), ([-1], "[-1]")])
def test_a_list_that_is_not_distinct_cpu_numbers_is_refused(cpus, wrong):
    with pytest.raises(ConfigError) as error:
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                             "server": {"cpus": cpus}})
    assert str(error.value) == f"server.cpus: expected a list of distinct CPU numbers, got {wrong}"


def test_a_cpu_this_machine_does_not_offer_stops_serve_naming_those_it_does(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: 127.0.0.1:0\npools: {cpu: {backends: ['127.0.0.1:1']}}\nserver: {cpus: [4096]}\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (f"server.cpus: CPU 4096 is not among those this process may run on ({', '.join(map(str, AVAILABLE))})"
            in done.stderr)


def test_workers_auto_is_one_per_listed_cpu():
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                                  "server": {"cpus": [AVAILABLE[0]], "workers": "auto"}})
    assert config.server.resolved_workers() == 1


def _allowed(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of `pid` and of every process below it, e.g. {"1"}."""
    lists = set()
    for process in (pid, *descendants(pid)):
        for task in os.listdir(f"/proc/{process}/task"):
            try:
                with open(f"/proc/{process}/task/{task}/status") as status:
                    lists |= {line.split(":", 1)[1].strip() for line in status if line.startswith("Cpus_allowed_list")}
            except FileNotFoundError:  # the thread ended meanwhile
                pass
    return lists


@needs_two_cpus
def test_a_single_gateway_and_its_envoy_run_on_the_cpu_given(tmp_path, triton):
    cpu = AVAILABLE[-1]
    path = tmp_path / "gateway.yaml"
    path.write_text(f"listen: 127.0.0.1:{find_free_port()}\npools: {{cpu: {{backends: ['{triton.grpc_address}']}}}}\n"
                    f"server: {{engine: envoy, cpus: [{cpu}]}}\n")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert "serving on" in process.stdout.readline()
        assert any(os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "envoy" for pid in descendants(process.pid))
        assert _allowed(process.pid) == {str(cpu)}
    finally:
        process.terminate()
        process.wait(timeout=60)


@needs_two_cpus
@pytest.mark.parametrize("engine", ["envoy", "grpcio", "h2"])
def test_each_worker_runs_on_its_own_cpu_and_the_supervisor_on_all(triton, engine):
    first, second = AVAILABLE[-1], AVAILABLE[0]
    config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [triton.grpc_address]}},
              "server": {"cpus": [first, second]}}
    with WorkersProcess(config, workers=2, engine=engine) as process:
        pids = wait_until(lambda: process.worker_pids(), accept=lambda found: len(found) == 2 and all(found.values()),
                          timeout=60, what="both workers in the snapshot")
        supervisor = process.process.pid
        below = descendants(supervisor)
        children = set(below).difference(*(descendants(pid) for pid in below))  # the supervisor's own
        # The pid a worker reports is its process's, or (envoy engine) its Envoy's below it.
        workers = {worker: next(child for child in children if pid == child or pid in descendants(child))
                   for worker, pid in pids.items()}
        assert _allowed(workers[0]) == {str(first)}
        assert _allowed(workers[1]) == {str(second)}
        assert os.sched_getaffinity(supervisor) == set(AVAILABLE)
