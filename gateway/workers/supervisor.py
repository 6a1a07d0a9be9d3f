"""The parent of several workers: one port, N processes, restarted when they die, drained together.

    parent (tensorgate serve --workers N)
      ├─ reserves the listen port (a bound, never listening SO_REUSEPORT socket), so port 0 works
      │  and no other program takes the port between worker restarts
      ├─ Hub on a unix socket in a private temp dir: merged metrics, drift, admin (hub.py)
      └─ worker 0..N-1: `python -m gateway serve --config … --listen host:port`, each with its role
         in the environment; every worker listens on the same port with SO_REUSEPORT (Envoy's
         reuse_port on the envoy engine) and the kernel gives each new connection to one of them

A worker that exits while the parent is serving is restarted (after 0.5 s, doubling up to 10 s while
it keeps dying within 5 s of its start); each runs in a process group of its own, which is killed
when it ends, so an Envoy it started cannot outlive it. SIGTERM (or SIGINT) is forwarded to every
worker, which drains on its own (server.grace_s); the parent waits for them, kills what is left
after the grace period and a margin, and exits. SIGHUP is forwarded to every worker (for the config
reload each worker does when the gateway has one; today a worker logs it and keeps serving). A parent killed outright takes its workers along (PR_SET_PDEATHSIG: each gets SIGTERM
and drains). The parent logs each worker's start, exit and restart, and a worker whose reports stop
arriving; the admin snapshot lists every worker's state under "workers".
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from gateway.child_process import ChildProcess, create_subprocess_exec
from gateway.config import GatewayConfig
from gateway.workers.hub import Hub
from gateway.workers.role import WorkerRole

log = logging.getLogger(__name__)

#: A worker that ran at least this long before it died is restarted after the first backoff again.
STABLE_AFTER_S = 5.0
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0
#: Time the workers get to stop beyond server.grace_s (Envoy's own stop, the last reports).
STOP_MARGIN_S = 15.0
READY_LINE = "tensorgate serving on "
#: util-linux `setpriv --pdeathsig TERM` execs the worker with PR_SET_PDEATHSIG set (it survives
#: exec): a parent that is killed outright (OOM, SIGKILL) takes its workers with it, drained,
#: instead of leaving them serving the port with nobody to merge their numbers.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """A bound SO_REUSEPORT socket on `listen` (port 0: a free one), and the listen address with its port."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((bare, int(port)))
    return holder, f"{host}:{holder.getsockname()[1]}"


@dataclass
class WorkerSlot:
    """One worker's place: the process now in it, and its history."""

    worker_id: int
    process: ChildProcess | None = None
    started_at: float = 0.0
    ready: bool = False
    ready_at: float = 0.0
    restarts: int = 0
    exits: list[int] = field(default_factory=list)  # exit statuses of its past processes
    reporting: bool = True  # last seen state of its reports, for logging changes

    @property
    def pid(self) -> int | None:
        process = self.process
        return None if process is None or process.returncode is not None else process.pid


class Supervisor:
    """Runs `count` workers of `config` (read by each from `config_path`) on one port until SIGTERM."""

    def __init__(self, config: GatewayConfig, config_path: str, count: int, *, listen: str | None = None,
                 verbose: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.listen = listen or config.listen
        self.verbose = verbose
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.hub = Hub(config, self.workers_status)
        self.address: str | None = None
        self._stopping = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._holder: socket.socket | None = None
        self._directory: tempfile.TemporaryDirectory | None = None
        self._hub_address: str | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.address} workers={[slot.pid for slot in self.slots]}>"

    # -- the parent's own state --------------------------------------------------------------

    def _stale_after_s(self) -> float:
        return max(1.0, 8 * self.config.server.workers_report_s)

    def workers_status(self) -> dict:
        status = {}
        for slot in self.slots:
            age = self.hub.report_age_s(slot.worker_id)
            alive = slot.pid is not None
            status[str(slot.worker_id)] = {
                "pid": slot.pid, "alive": alive, "ready": slot.ready, "restarts": slot.restarts,
                "exits": slot.exits[-5:], "report_age_s": None if age is None else round(age, 3),
                "healthy": alive and slot.ready and age is not None and age < self._stale_after_s(),
            }
        return status

    # -- running -------------------------------------------------------------------------------

    async def run(self, on_ready=None) -> int:
        """Serve until SIGTERM/SIGINT; `on_ready(supervisor)` once every worker serves. Returns the exit status."""
        self._holder, self.address = reserve_port(self.listen)
        self._directory = tempfile.TemporaryDirectory(prefix="tensorgate-workers-")
        os.chmod(self._directory.name, 0o700)
        self._hub_address = f"unix:{os.path.join(self._directory.name, 'hub.sock')}"
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            await self.hub.start(self._hub_address)
            keepers = [asyncio.ensure_future(self._keep(slot)) for slot in self.slots]
            watcher = asyncio.ensure_future(self._watch_reports())
            ready = asyncio.ensure_future(self._all_ready.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
            if self._all_ready.is_set() and not self._stopping.is_set() and on_ready is not None:
                on_ready(self)
            await stopping
            watcher.cancel()
            await self._stop_workers()
            # Every process has ended: each keeper logs its worker's exit and returns.
            _, late = await asyncio.wait(keepers, timeout=5.0)
            for keeper in late:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.hub.stop()
            self._holder.close()
            self._directory.cleanup()
        return 0

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "gateway"]
        if _SETPRIV is not None:
            command = [_SETPRIV, "--pdeathsig", "TERM", "--", *command]
        if self.verbose:
            command.append("-v")
        return [*command, "serve", "--config", self.config_path, "--listen", self.address]

    async def _spawn(self, slot: WorkerSlot) -> None:
        role = WorkerRole(slot.worker_id, self._hub_address, self.config.server.workers_report_s)
        # Started by CPython's subprocess, not the loop's (gateway/child_process.py); its wait()
        # returns when the worker ends, even while a grandchild (its Envoy, say) that inherited
        # its standard output still holds the pipe.
        slot.process = await create_subprocess_exec(
            *self._command(), env={**os.environ, **role.environment()}, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: killed with everything it started
        )
        slot.started_at = time.monotonic()
        slot.ready = False
        log.info("worker %d started (pid %d)", slot.worker_id, slot.process.pid)

    async def _relay(self, slot: WorkerSlot, process) -> None:
        """The worker's standard output: its ready line marks it serving; every line goes to ours."""
        while True:
            line = await process.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text.startswith(READY_LINE) and process is slot.process:
                slot.ready, slot.ready_at = True, time.monotonic()
                if all(s.ready for s in self.slots):
                    self._all_ready.set()
            print(f"[worker {slot.worker_id}] {text}", flush=True)

    async def _keep(self, slot: WorkerSlot) -> None:
        """Keep a worker running in `slot` until the parent stops."""
        backoff = FIRST_BACKOFF_S
        while not self._stopping.is_set():
            await self._spawn(slot)
            process = slot.process
            relay = asyncio.ensure_future(self._relay(slot, process))
            status = await process.wait()
            self._kill_group(process.pid)  # what it started goes with it, and lets go of its output
            await asyncio.gather(relay, return_exceptions=True)
            self.hub.worker_exited(slot.worker_id, process.pid)
            slot.exits.append(status)
            slot.ready = False
            if self._stopping.is_set():
                log.info("worker %d (pid %d) stopped with status %d", slot.worker_id, process.pid, status)
                return
            lived = time.monotonic() - slot.started_at
            backoff = FIRST_BACKOFF_S if lived >= STABLE_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            log.warning("worker %d (pid %d) exited with status %d after %.1f s; restarting in %.1f s",
                        slot.worker_id, process.pid, status, lived, backoff)
            try:
                await asyncio.wait_for(self._stopping.wait(), backoff)
                return
            except asyncio.TimeoutError:
                pass
            slot.restarts += 1

    @staticmethod
    def _kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _forward(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass
        log.info("forwarded %s to the workers", signal.Signals(sig).name)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; wait for them (grace + margin); kill what is left."""
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.grace_s + STOP_MARGIN_S
        for slot in self.slots:
            process = slot.process
            if process is None or process.returncode is not None:
                continue
            try:
                await asyncio.wait_for(process.wait(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("worker %d (pid %d) did not stop in time; killing it", slot.worker_id, process.pid)
                self._kill_group(process.pid)
                await process.wait()

    async def _watch_reports(self) -> None:
        """Log a worker whose reports stop arriving, and when they come back."""
        while True:
            await asyncio.sleep(1.0)
            for slot in self.slots:
                if not slot.ready:
                    continue
                age = self.hub.report_age_s(slot.worker_id)
                if age is None or time.monotonic() - slot.ready_at < age:  # nothing yet from this process
                    age = time.monotonic() - slot.ready_at
                reporting = age < self._stale_after_s()
                if reporting != slot.reporting:
                    slot.reporting = reporting
                    if reporting:
                        log.info("worker %d (pid %s) reports again", slot.worker_id, slot.pid)
                    else:
                        log.warning("worker %d (pid %s) has not reported for %.1f s", slot.worker_id, slot.pid, age)
