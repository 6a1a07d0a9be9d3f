"""CPU time of a running process (user + system, all of its threads), read from /proc.

    before = cpu_seconds(pid); ...load...; used = cpu_seconds(pid) - before

`/proc/PID/stat` sums every thread of the process (the thread group); children are not counted.
Its resolution is one clock tick (usually 10 ms), so measure windows of seconds, not milliseconds.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "cpu_seconds_many"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` in seconds; raises ProcessLookupError if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except FileNotFoundError as error:
        raise ProcessLookupError(f"no process {pid}") from error
    # Fields after "(comm) ": state(3) ppid(4) ... utime(14) stime(15); comm may contain ') '.
    fields = stat[stat.rfind(b")") + 2 :].split()
    utime_ticks, stime_ticks = int(fields[11]), int(fields[12])
    return (utime_ticks + stime_ticks) / _CLOCK_TICKS


def cpu_seconds_many(pids: "list[int] | tuple[int, ...]") -> dict[int, float]:
    """cpu_seconds of each pid, read back to back (for the edges of one measurement window)."""
    return {pid: cpu_seconds(pid) for pid in pids}
