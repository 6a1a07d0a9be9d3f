"""gateway/child_process.py: children started by CPython's subprocess, awaited on the gateway's loop.

Why it exists: uvloop's create_subprocess_exec runs Python in the forked child before exec (its
at-fork hook calls PyOS_AfterFork_Child), which crashed now and then in a process with many
threads. The first test shows that difference directly: a Python at-fork hook that leaves a mark
runs in uvloop's child, and not in ours.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from gateway.child_process import ChildProcess, create_subprocess_exec
from tests.waiting import process_running


def run(coroutine_function, *args, **kwargs):
    return uvloop.run(coroutine_function(*args, **kwargs))


_BOTH_STARTS = """
import asyncio, os, sys, uvloop
from gateway.child_process import create_subprocess_exec

marks = sys.argv[1]
os.register_at_fork(after_in_child=lambda: open(os.path.join(marks, str(os.getpid())), "w").close())

async def start_both():
    uv_child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    ours = await create_subprocess_exec(sys.executable, "-c", "pass")
    print(await uv_child.wait(), await ours.wait(), uv_child.pid, ours.pid)

uvloop.run(start_both())
"""


def test_no_python_runs_in_the_child_before_exec(tmp_path):
    """An at-fork hook (PyOS_AfterFork_Child runs these in a forked child) that leaves the child's
    pid: uvloop's child runs it, ours does not. In a process of its own, so that the hook (which
    cannot be removed) adds no Python to any other child of the test run."""
    marks = tmp_path / "marks"
    marks.mkdir()
    done = subprocess.run([sys.executable, "-c", _BOTH_STARTS, str(marks)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    uv_status, our_status, uv_pid, our_pid = (int(word) for word in done.stdout.split())
    assert (uv_status, our_status) == (0, 0)
    marked = {int(name) for name in os.listdir(marks)}
    assert uv_pid in marked  # uvloop's child ran the hook: Python between fork and exec
    assert our_pid not in marked  # ours ran none


def test_wait_returncode_and_signals():
    async def scenario():
        child = await create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
        assert isinstance(child, ChildProcess) and child.returncode is None
        waiting = asyncio.ensure_future(child.wait())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it runs
        child.terminate()
        status = await asyncio.wait_for(waiting, 10)
        assert status == child.returncode == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            child.kill()
        assert await child.wait() == -signal.SIGTERM  # again, at once
        quick = await create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
        return await asyncio.wait_for(quick.wait(), 10)

    assert run(scenario) == 3


def test_wait_returns_when_the_child_ends_while_a_grandchild_holds_its_output():
    """The workers' supervisor relies on it: a worker's Envoy inherits the worker's stdout."""
    script = ("import subprocess, sys; "
              "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
              "print(grandchild.pid, flush=True)")

    async def scenario():
        child = await create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
        grandchild = int(await asyncio.wait_for(child.stdout.readline(), 10))
        try:
            status = await asyncio.wait_for(child.wait(), 10)
            still_open = not child.stdout.at_eof()
        finally:
            os.kill(grandchild, signal.SIGKILL)
        return status, still_open, await asyncio.wait_for(child.stdout.read(), 10)

    status, still_open, rest = run(scenario)
    assert status == 0 and still_open and rest == b""  # ended while its output was open; EOF once the grandchild went


def test_unknown_options_are_refused():
    async def scenario():
        await create_subprocess_exec(sys.executable, "-c", "pass", preexec_fn=lambda: None)

    with pytest.raises(TypeError, match="preexec_fn"):
        run(scenario)


def test_wait_polls_where_there_is_no_pidfd(monkeypatch):
    def no_pidfd(pid):
        raise OSError(errno.ENOSYS, "no pidfd here")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def scenario():
        child = await create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(0.3); raise SystemExit(4)")
        return await asyncio.wait_for(child.wait(), 10)

    assert run(scenario) == 4


def test_a_start_that_fails_after_the_child_started_leaves_no_child(monkeypatch, tmp_path):
    """The pipe's reader cannot be set up (cancelled, say): the child is killed and reaped, not left
    running with nobody to wait for it."""
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"

    async def refuse(self, protocol_factory, pipe):
        for _ in range(500):  # until the child has written its pid
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    monkeypatch.setattr(asyncio.unix_events._UnixSelectorEventLoop, "connect_read_pipe", refuse)

    async def scenario():
        with pytest.raises(asyncio.CancelledError):
            await create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)

    asyncio.run(scenario())  # the stdlib loop, whose connect_read_pipe is patched
    child = int(pid_file.read_text())
    assert not process_running(child)


def test_pipes_for_stdin_or_stderr_are_refused():
    async def scenario(**pipe):
        await create_subprocess_exec(sys.executable, "-c", "pass", **pipe)

    for pipe in ({"stderr": asyncio.subprocess.PIPE}, {"stdin": asyncio.subprocess.PIPE}):
        with pytest.raises(ValueError, match="only stdout may be a pipe"):
            run(scenario, **pipe)
