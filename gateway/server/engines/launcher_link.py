"""An Envoy that dies with the process that launched it.

The envoy engine's Envoy is a child of the gateway process (`tensorgate serve`, a worker). When
that process is killed outright (SIGKILL, the OOM killer) nothing stops its Envoy, which would go
on serving the port with nobody to drain, reload or supervise it, and would hold whatever the
launcher's own parent reads from (a supervisor waiting for its worker's output to end would wait
forever). pyvoy spawns Envoy itself, so the launcher cannot wrap the command in `setpriv
--pdeathsig` as it does for Triton; instead the app inside Envoy sets the kernel's parent-death
signal on its event-loop thread at startup (PR_SET_PDEATHSIG is kept per thread, and the kernel
signals the whole process when any of its threads has it set), then checks that the launcher is
still its parent, since it may have died before the call.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

__all__ = ["ENV_LAUNCHER_PID", "follow_launcher"]

log = logging.getLogger(__name__)

ENV_LAUNCHER_PID = "TENSORGATE_ENVOY_LAUNCHER_PID"
"""The pid of the process that launched Envoy; unset (Envoy run by hand, in a container): no link."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_launcher(signal_number: int = signal.SIGTERM) -> bool:
    """Have this process get `signal_number` when its launcher (ENV_LAUNCHER_PID) ends; if it has
    already ended, send it now. Call it on a thread that lives as long as the process. False when
    there is no launcher to follow or the platform has no parent-death signal."""
    launcher = os.environ.get(ENV_LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal_number), 0, 0, 0) != 0:
        log.warning("cannot follow the launcher (pid %s): prctl failed: %s", launcher,
                    os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != int(launcher):  # it ended before prctl: no signal will come
        log.warning("the launcher (pid %s) is gone; stopping", launcher)
        os.kill(os.getpid(), signal_number)
    return True
