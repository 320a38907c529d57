"""Child processes the node starts (proxied stdio MCP servers), and the promise that none
outlives it.

Each child is started as the leader of its own process group (``start_new_session``), so
everything it forks can be signalled at once with ``killpg``, and is recorded in the state
dir (:class:`ChildRecord`, one line per group: its id and its leader's start time) while it
may be alive. Three ways a child ends:

* :meth:`Child.stop`, the normal end: stdin closed (MCP's stdio shutdown: "the client SHOULD
  initiate shutdown by first closing the input stream to the child process", specification
  ``basic/lifecycle``), then SIGTERM to the group after ``grace`` seconds, then SIGKILL;
  whatever the leader did, the group is sent SIGKILL last (a grandchild that ignored the
  rest must not survive it).
* the node killed (SIGKILL, a crash): its children's stdin reaches EOF, and a well-behaved
  server exits; the record stays.
* the next start on the same state dir: :meth:`ChildRecord.reap` sends SIGKILL to every
  group still recorded, unless its id now belongs to an unrelated process (the leader's
  start time differs), then clears the record.

Linux and macOS (POSIX process groups); the start-time check reads ``/proc`` where it
exists, and on a system without it a recorded group with a live leader is left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
import trio

__all__ = ["Child", "ChildRecord", "start_child"]

log = structlog.get_logger("children")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or
    ``None`` if it does not exist or cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) may contain spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _group_has_members(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChildRecord:
    """The state dir's record of the node's child process groups (``children``, a text
    file: ``PGID START_TIME`` per line). Used from the trio thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._groups: dict[int, str] = {}

    def reap(self) -> int:
        """Kill the groups a previous node left (module doc) and clear the record; how many
        groups were signalled."""
        killed = 0
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                pgid_text, started = line.split()
                pgid = int(pgid_text)
            except ValueError:
                continue
            if pgid <= 1 or not _group_has_members(pgid):
                continue
            leader_started = _start_time(pgid)
            if leader_started is not None and leader_started != started:
                continue  # the id was reused by a process that is not ours
            if leader_started is None and not Path("/proc/self").exists():
                continue  # no way to tell: leave it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
                killed += 1
                log.warning("children.orphan_killed", pgid=pgid)
        self._groups.clear()
        self._write()
        return killed

    def add(self, pgid: int) -> None:
        self._groups[pgid] = _start_time(pgid) or "?"
        self._write()

    def remove(self, pgid: int) -> None:
        if self._groups.pop(pgid, None) is not None:
            self._write()

    def _write(self) -> None:
        text = "".join(f"{pgid} {started}\n" for pgid, started in self._groups.items())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


class Child:
    """A started child process: its pipes, and :meth:`stop`."""

    def __init__(self, process: trio.Process, record: ChildRecord, name: str) -> None:
        self.process = process
        self.name = name
        self._record = record

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, grace: float = 2.0) -> int | None:
        """End the child and its whole group (module doc); its exit status (``None`` if it
        had to be killed without one being collected). Shielded: safe in a cancelled scope,
        and it takes at most ``2 * grace`` seconds plus the final kill."""
        process = self.process
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.aclose()
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
                with trio.move_on_after(grace):
                    await process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(grace):
                await process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()
        self._record.remove(process.pid)
        return process.returncode


async def start_child(
    command: Sequence[str],
    *,
    name: str,
    record: ChildRecord,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Child:
    """Start ``command`` as the leader of a new process group, stdin/stdout/stderr piped,
    recorded in ``record``. Raises ``OSError`` if it cannot be started (no such command)."""
    process = await trio.lowlevel.open_process(
        list(command),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    record.add(process.pid)
    log.info("children.started", child=name, pid=process.pid)
    return Child(process, record, name)
