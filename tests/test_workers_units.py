"""Units of the workers package: adding reports up, a restarted worker's counts kept, the config keys."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.server.model_statistics import GatewayCounts
from gateway.telemetry.aggregates import SeriesSnapshot
from gateway.workers.hub import Hub
from gateway.workers.merge import merged_backends, merged_batching_snapshot
from gateway.workers.report import BackendGauge, WorkerReport
from gateway.workers.role import WorkerRole
from gateway.workers.supervisor import Supervisor
from tests.waiting import process_running, wait_until_async

POOLS = {"main": {"backends": ["127.0.0.1:1"]}}


def _series(count: int, buckets: tuple[int, ...], low: float, high: float, status: str = "OK") -> SeriesSnapshot:
    return SeriesSnapshot({"model": "m", "rpc.response.status_code": status}, count, count * 0.001, low, high, buckets)


def _report(worker: int, pid: int, requests: int, outstanding: int = 0, healthy: bool = True) -> WorkerReport:
    report = WorkerReport(worker, pid)
    report.requests = [_series(requests, (requests, 0), 0.001 * (worker + 1), 0.002 * (worker + 1))]
    report.routing = {("main", "preferred"): requests}
    report.counts = {("m", "1"): GatewayCounts(success_count=requests, success_ns=requests * 10, last_inference_ms=pid)}
    report.backends = [BackendGauge("b:1", "main", healthy, outstanding, "healthy" if healthy else "unhealthy",
                                    served=requests)]
    return report


def test_reports_add_up_series_by_attributes_and_buckets():
    hub = Hub(config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS}))
    hub.receive(_report(0, 100, 5))
    hub.receive(_report(1, 200, 7))
    [requests] = hub.totals().requests.values()
    assert (requests.count, requests.bucket_counts) == (12, (12, 0))
    assert (requests.min_s, requests.max_s) == (0.001, 0.004)
    assert hub.totals().routing == {("main", "preferred"): 12}
    assert hub.totals().counts[("m", "1")] == GatewayCounts(success_count=12, success_ns=120, last_inference_ms=200)
    # a newer report of a worker replaces its older one (reports are cumulative, never deltas)
    hub.receive(_report(0, 100, 6))
    assert next(iter(hub.totals().requests.values())).count == 13


def test_a_restarted_or_dead_worker_keeps_its_counts_and_loses_its_gauges():
    hub = Hub(config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS}))
    hub.receive(_report(0, 100, 5, outstanding=3))
    hub.receive(_report(1, 200, 7, outstanding=4))
    hub.receive(_report(0, 101, 1))  # worker 0 restarted: its new process counts from zero
    assert next(iter(hub.totals().requests.values())).count == 13  # 5 (retired) + 1 + 7: never down
    hub.worker_exited(1, 200)
    totals = hub.totals()
    assert next(iter(totals.requests.values())).count == 13
    [backend] = merged_backends(list(hub.latest.values()), totals)
    assert backend.outstanding == 0 and backend.served == 13  # the dead worker's in-flight gauge is gone
    hub.worker_exited(1, 200)  # told twice: counted once
    assert next(iter(hub.totals().requests.values())).count == 13


def test_a_backend_is_healthy_only_while_every_worker_has_it():
    reports = [_report(0, 100, 1, outstanding=2), _report(1, 200, 1, outstanding=5, healthy=False)]
    [backend] = merged_backends(reports, Hub(config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS})).totals())
    assert not backend.healthy and backend.health == "unhealthy" and backend.outstanding == 7


def test_batching_snapshots_add_up_with_weighted_means():
    one = {"m:1": {"batches": 2, "requests": 4, "rows": 4, "batch_sizes": {"2": 2}, "reasons": {"turn": 2},
                   "mean_queue_delay_us": 10.0, "max_queue_delay_us": 20.0, "waiting": 1}}
    two = {"m:1": {"batches": 1, "requests": 4, "rows": 4, "batch_sizes": {"4": 1}, "reasons": {"full": 1},
                   "mean_queue_delay_us": 40.0, "max_queue_delay_us": 50.0, "waiting": 0}}
    merged = merged_batching_snapshot([one, two])["m:1"]
    assert merged["batches"] == 3 and merged["requests"] == 8 and merged["waiting"] == 1
    assert merged["batch_sizes"] == {2: 2, 4: 1} and merged["reasons"] == {"turn": 2, "full": 1}
    assert merged["mean_queue_delay_us"] == 25.0 and merged["max_queue_delay_us"] == 50.0
    assert merged["mean_batch_rows"] == 8 / 3


def test_workers_config_and_role():
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS, "server": {"workers": "auto"}})
    assert config.server.resolved_workers() == len(os.sched_getaffinity(0))
    assert config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS, "server": {"workers": 3}}).server.resolved_workers() == 3
    assert config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS}).server.resolved_workers() == 1
    for bad in (0, "many", True, 2.5):
        with pytest.raises(ConfigError, match="server.workers"):
            config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS, "server": {"workers": bad}})
    role = WorkerRole(3, "unix:/tmp/x.sock", 0.5)
    assert WorkerRole.from_environment(role.environment()) == role
    assert WorkerRole.from_environment({}) is None


def test_serve_refuses_a_bad_worker_count_with_exit_2(tmp_path, capsys):
    from gateway.cli import main

    path = tmp_path / "gateway.yaml"
    path.write_text("listen: 127.0.0.1:0\npools: {main: {backends: ['127.0.0.1:1']}}\n")
    assert main(["serve", "--config", str(path), "--workers", "0"]) == 2
    assert "--workers: expected a number of processes (1 or more) or auto, got '0'" in capsys.readouterr().err


# A stand-in worker: it starts a child that inherits its standard output (as an Envoy would that
# outlives its worker), says it serves, and waits. The parent's pipe stays open while the child lives.
_WORKER_WITH_A_CHILD = """
import pathlib, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
print("tensorgate serving on stand-in", flush=True)
time.sleep(600)
"""


async def test_a_killed_worker_is_restarted_while_a_process_it_started_holds_its_output(tmp_path):
    child_file = tmp_path / "child.pid"

    class StandInWorkers(Supervisor):
        def _command(self) -> list[str]:
            return [sys.executable, "-c", _WORKER_WITH_A_CHILD, str(child_file)]

    supervisor = StandInWorkers(config_from_mapping({"listen": "127.0.0.1:0", "pools": POOLS}),
                                str(tmp_path / "unused.yaml"), 1)
    running = asyncio.ensure_future(supervisor.run())
    try:
        slot = supervisor.slots[0]
        await wait_until_async(lambda: slot.ready and child_file.exists(), "the stand-in worker to serve", 30)
        worker, child = slot.pid, int(child_file.read_text())
        child_file.unlink()
        os.kill(worker, signal.SIGKILL)
        # Seen to end although its child still holds its output: restarted, and the child killed with it.
        await wait_until_async(lambda: slot.restarts == 1 and slot.ready and child_file.exists(),
                               "the killed worker to be restarted", 30)
        assert slot.pid != worker and slot.exits == [-signal.SIGKILL]
        assert not process_running(child)
    finally:
        supervisor._stopping.set()
        assert await asyncio.wait_for(running, 60) == 0
    assert not process_running(int(child_file.read_text()))  # the second worker's child went with it at the stop
