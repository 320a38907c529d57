"""Process metrics read from /proc: CPU seconds of a process tree, resident memory.

Linux only. CPU is utime+stime of every live process in the tree, read twice; a process that
appears between the two readings counts from zero, one that exits in between is lost (the
benchmark windows are short and the servers keep their workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process, in seconds (0.0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of a process (all its threads' children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(c) for c in text.split())
    return out


def tree(roots: Iterable[int]) -> list[int]:
    """The given processes and all their descendants."""
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children(pid))
    return seen


def cpu_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """CPU seconds per process of the trees rooted at ``roots``."""
    return {pid: cpu_seconds(pid) for pid in tree(roots)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots by the processes alive at the second."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat, everything but idle)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...), 0 if absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Memory:
    """Resident memory of one process, in KiB."""

    rss_kib: int
    peak_kib: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        return cls(rss_kib=status_kib(pid, "VmRSS"), peak_kib=status_kib(pid, "VmHWM"))


def postmaster_pids(state_dir: Path) -> list[int]:
    """PIDs of PostgreSQL postmasters whose data directory lies under ``state_dir``.

    The embedded Postgres of ``exai serve`` daemonizes, so it is not a child of the server:
    its CPU is found through ``postmaster.pid`` instead.
    """
    pids: list[int] = []
    for pidfile in state_dir.rglob("postmaster.pid"):
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids
