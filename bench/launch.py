"""Processes the harness owns: each in its own process group, always stopped by the harness.

``Owned`` starts a command in a new session (so its whole group can be signalled), with its
output going to a log file, and ``stop()`` ends it: SIGTERM to the main process (a graceful
shutdown), then SIGKILL to whatever is left of its group. Use it as a context manager so that
every exit path, exceptions and Ctrl-C included, stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO


def raise_nofile_limit() -> int:
    """Raise this process's soft descriptor limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL me if the harness dies without stopping me (a last
    resort for a harness killed with SIGKILL; every other exit path stops children itself)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that the harness's cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, deadline: float, alive: Owned) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail if the process exits first."""
    while True:
        if alive.returncode() is not None:
            raise RuntimeError(f"{alive.name} exited with {alive.returncode()}; see {alive.log}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive.name} did not listen on port {port}; see {alive.log}")
        time.sleep(0.05)


class Owned:
    """A child process in its own process group; stopped on ``stop()`` or context exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pipe_stdio: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdio else self._log_file,
            stderr=self._log_file,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
        )
        if pipe_stdio:
            threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def returncode(self) -> int | None:
        return self.proc.poll()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, deadline: float) -> str:
        """The next stdout line (pipe_stdio only); TimeoutError / EOFError otherwise."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError(f"{self.name}: no output in time; see {self.log}")
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output in time; see {self.log}") from None
        if line is None:
            raise EOFError(f"{self.name} exited ({self.proc.wait()}); see {self.log}")
        return line

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, wait up to ``grace`` s, then SIGKILL its whole group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()

    def __enter__(self) -> Owned:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(grace=2.0 if exc_type is not None else 10.0)


def stop_pids(pids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM processes this harness caused to exist but that left its process groups
    (a daemonized Postgres), wait, then SIGKILL."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
