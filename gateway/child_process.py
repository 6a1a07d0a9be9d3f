"""Child processes started with CPython's subprocess (vfork and exec), awaited on any event loop.

The gateway starts children from its event loop: the envoy engine's Envoy (through pyvoy), and
the workers' supervisor its workers. On uvloop, `asyncio.create_subprocess_exec` forks and then,
in the child, runs Python before exec (uvloop's at-fork hook calls PyOS_AfterFork_Child: the
interpreter's and every module's at-fork hooks). In a process with many threads (gRPC's, the
telemetry exporters'), such a child has been seen to crash there: an Envoy that "exited while
starting" with SIGSEGV 0.08 s after it was started, with nothing on its stderr, about once per
full test run late in the suite; and once a printed "Fatal Python error: Segmentation fault" from
a forked child. CPython's own subprocess starts a child with vfork() and exec, and runs no Python
in between.

`create_subprocess_exec` starts the child that way and returns a `ChildProcess`: the face of an
asyncio.subprocess.Process (pid, returncode, wait, send_signal, terminate, kill, a piped stdout as
a StreamReader) on whatever loop runs. The loop learns of the exit through a pidfd (Linux 5.3+),
or by polling every POLL_S where there is none. The child is started on the calling thread,
which must outlive it where the child follows its parent with PR_SET_PDEATHSIG (the kernel
signals when the *thread* that started the child ends): the loop's own thread does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import types

__all__ = ["ChildProcess", "create_subprocess_exec", "asyncio_for_pyvoy"]

#: Polling interval of wait() where the kernel has no pidfd.
POLL_S = 0.05


class ChildProcess:
    """A started child, seen as asyncio.subprocess.Process is: `returncode` None while it runs."""

    def __init__(self, popen: subprocess.Popen, stdout: asyncio.StreamReader | None = None) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = None
        self.stdout = stdout
        self.stderr = None

    def __repr__(self) -> str:
        return f"<ChildProcess {self.pid} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: the signal that ended it); None while it runs. Reaps it."""
        return self._popen.poll()

    async def wait(self) -> int:
        """Until the child exits; its exit status."""
        if self.returncode is not None:
            return self._popen.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd here, or it was just reaped
            while self.returncode is None:
                await asyncio.sleep(POLL_S)
            return self._popen.returncode
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            if self.returncode is None:
                await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.wait()

    def send_signal(self, signal_number: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has exited")
        os.kill(self.pid, signal_number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def create_subprocess_exec(program, *args, stdin=None, stdout=None, stderr=None, env=None,
                                 start_new_session: bool = False, **options) -> ChildProcess:
    """asyncio.create_subprocess_exec, started by subprocess.Popen (see the module).

    stdout may be asyncio.subprocess.PIPE: it is then read through a StreamReader on this loop.
    Pipes to stdin or stderr, and `options` other than these, are refused rather than left with
    nobody at the other end (a child writing to an unread pipe blocks once it is full)."""
    if options:
        raise TypeError(f"create_subprocess_exec: unsupported options {sorted(options)}")
    if subprocess.PIPE in (stdin, stderr):
        raise ValueError("create_subprocess_exec: only stdout may be a pipe; give stdin and stderr a file, "
                         "DEVNULL or None (inherited)")
    popen = subprocess.Popen([program, *args], stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                             start_new_session=start_new_session)
    reader = None
    if stdout == subprocess.PIPE:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), popen.stdout)
        except BaseException:  # cancelled or failed: no child is left running without an owner
            popen.kill()
            popen.wait()
            try:
                popen.stdout.close()
            except OSError:
                pass
            raise
    return ChildProcess(popen, reader)


def asyncio_for_pyvoy() -> types.ModuleType:
    """asyncio as pyvoy's server module should see it: itself, but with its children started
    here. pyvoy 1.3 starts Envoy with `asyncio.create_subprocess_exec` and offers no other way."""
    facade = types.ModuleType("asyncio", "asyncio, with children started by gateway.child_process")
    facade.__getattr__ = lambda name: getattr(asyncio, name)  # module __getattr__ (PEP 562)
    facade.create_subprocess_exec = create_subprocess_exec
    return facade
