"""CPU time of a running process (user + system, all of its threads), read from /proc.

    before = cpu_seconds(pid); ...load...; used = cpu_seconds(pid) - before

`/proc/PID/stat` sums every thread of the process (the thread group); children are not counted by
`cpu_seconds`, and are by `cpu_seconds_tree` (a gateway on the envoy engine is a launcher process
whose Envoy child runs the gateway's Python). Its resolution is one clock tick (usually 10 ms), so
measure windows of seconds, not milliseconds.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "cpu_seconds_many", "cpu_seconds_tree", "descendants"]

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


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, their children, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(int(entry))
            if parent is not None:
                parents.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def cpu_seconds_tree(pid: int) -> float:
    """cpu_seconds of `pid` and of every live process below it."""
    total = cpu_seconds(pid)
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except ProcessLookupError:  # ended between the listing and the read
            pass
    return total


def cpu_seconds_many(pids: "list[int] | tuple[int, ...]") -> dict[int, float]:
    """cpu_seconds of each pid, read back to back (for the edges of one measurement window)."""
    return {pid: cpu_seconds(pid) for pid in pids}
