"""gateway/child_process.py: children started by CPython's subprocess, awaited on the gateway's loop.

Why it exists: uvloop's create_subprocess_exec runs Python in the forked child before exec (its
at-fork hook calls PyOS_AfterFork_Child), which crashed now and then in a process with many
threads. The first test shows that difference directly: a Python at-fork hook that leaves a mark
runs in uvloop's child, and not in ours.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
import uvloop

from gateway.child_process import ChildProcess, create_subprocess_exec


def run(coroutine_function, *args):
    return uvloop.run(coroutine_function(*args))


_marks: list = []  # the folder the at-fork hook marks while the test below runs


def _mark() -> None:
    """An at-fork hook (PyOS_AfterFork_Child runs these in the child): leaves the child's pid."""
    if _marks:
        try:
            open(_marks[0] / str(os.getpid()), "w").close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_mark)  # hooks cannot be removed: it does nothing outside the test


def test_no_python_runs_in_the_child_before_exec(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    async def start_both():
        uv_child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        ours = await create_subprocess_exec(sys.executable, "-c", "pass")
        return await uv_child.wait(), await ours.wait(), uv_child.pid, ours.pid

    _marks.append(marks)
    try:
        uv_status, our_status, uv_pid, our_pid = run(start_both)
    finally:
        _marks.clear()
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
