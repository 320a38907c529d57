"""The state dir's ownership: ``server.lock``, held by the one server that uses the dir, and
``server.json``, how local tools (``exai status``, ``exai bridge``, the benchmarks) find it.

``server.json`` exists exactly while the server accepts connections: written when ready,
removed on shutdown. It is written atomically (temp file + rename) so a reader never sees half
of it.

``server.lock`` makes it one server per state dir (:class:`StateDirLock`): ``exai serve``
takes an exclusive ``flock(2)`` on it before anything else touches the dir, and keeps it for
its whole life. The kernel releases the lock when the process ends, however it ends (a crash,
``kill -9``), so a lock is never stale; the file itself stays, and holds the holder's pid (its
URL is in ``server.json`` once it serves), which is what a refused second server reports.
The file is never removed: a server that removed it while another was opening it could end
up holding a lock on a file nobody else sees.
"""

from __future__ import annotations

import errno
import fcntl
import os
from datetime import datetime
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, ValidationError

from storage.startup_errors import StateDirInUse, StateDirUnusable

LOCK_FILE = "server.lock"


class WorkerInfo(BaseModel):
    """One worker of a ``--workers`` server, as its parent lists it in ``server.json``."""

    index: int
    """1..N: the worker's place, kept by its successors (its files: ``workers/<index>/``)."""
    pid: int
    node_id: str
    """Its id in the database's ``nodes`` table (a successor registers a new one)."""
    admin_url: str | None
    """Its own admin interface (``exai status`` asks each)."""
    started_at: datetime


class ServerInfo(BaseModel):
    url: str
    """The WebSocket endpoint, ``ws://HOST:PORT/mcp`` (what ``exai bridge`` connects to)."""
    pid: int
    started_at: datetime
    protocol_versions: list[str]
    #: ``http://127.0.0.1:PORT`` of the admin interface (``exai status``); ``None`` in files
    #: written before it existed, or by a node that runs none.
    admin_url: str | None = None
    #: ``http://HOST:PORT/mcp``, the Streamable HTTP endpoint on the same port; ``None`` in
    #: files written before it was recorded.
    http_url: str | None = None
    #: The node's id in the ``nodes`` table; ``None`` for a ``--workers`` parent (no node
    #: itself: its workers are) and in files written before it was recorded.
    node_id: str | None = None
    #: A ``--workers`` parent's workers, by index (``admin_url`` above is the first one's, so
    #: tools that know one admin interface still find one); empty for a single node.
    workers: list[WorkerInfo] = []
    #: How many workers the parent runs (``workers`` lists those serving now: one being
    #: restarted is missing from it until its successor serves); 0 for a single node.
    worker_count: int = 0


def write_server_info(path: Path, info: ServerInfo) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(info.model_dump_json(indent=2) + "\n")
    os.replace(temporary, path)


def read_server_info(path: Path) -> ServerInfo | None:
    try:
        return ServerInfo.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def remove_server_info(path: Path) -> None:
    path.unlink(missing_ok=True)


class StateDirLock:
    """The exclusive lock of one state dir, for the life of the process that took it
    (:meth:`acquire`); :meth:`release` (or leaving the ``with`` block, or the process ending)
    gives it up."""

    def __init__(self, state_dir: Path, fd: int) -> None:
        self.state_dir = state_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Create ``state_dir`` if need be and lock it for this process.

        Raises :class:`~storage.startup_errors.StateDirInUse` naming the holder's pid and URL
        if another server holds it, and :class:`~storage.startup_errors.StateDirUnusable` if
        the dir cannot be created or its lock file cannot be written (exit code 5 for both).
        """
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            # access(2): the lock file may exist in a dir that is no longer writable (for
            # root, this still catches a read-only file system: EROFS).
            if not os.access(state_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(state_dir))
            fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise state_dir_unusable(state_dir, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(state_dir, fd)
            os.close(fd)
            raise StateDirInUse(
                f"state dir {state_dir} is in use by another exai server ({holder}): stop it "
                "first, or give this one another --state-dir (EXAI_STATE_DIR)"
            ) from None
        except OSError as exc:  # ENOLCK: a file system without locks (some NFS mounts)
            os.close(fd)
            raise state_dir_unusable(state_dir, exc) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # ENOSPC, EIO
            os.close(fd)
            raise state_dir_unusable(state_dir, exc) from exc
        return cls(state_dir, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def state_dir_unusable(state_dir: Path, error: OSError) -> StateDirUnusable:
    """The start-up error for a state dir (or a file in it) that cannot be written (exit 5)."""
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and Path(error.filename) != state_dir else ""
    return StateDirUnusable(
        f"state dir {state_dir} is unusable: {reason}{where}: choose another --state-dir "
        "(EXAI_STATE_DIR) or make this one a writable directory"
    )


def _holder(state_dir: Path, fd: int) -> str:
    """``pid N, URL`` of the server holding the lock, as far as it has told."""
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):  # the holder has locked but not yet written its pid
        return "pid unknown"
    try:
        info = read_server_info(state_dir / "server.json")
    except (OSError, ValidationError):
        info = None
    if info is None or info.pid != pid:  # none yet, or a dead predecessor's
        return f"pid {pid}, starting: not serving yet"
    return f"pid {pid}, serving {info.url}" + (f" and {info.http_url}" if info.http_url else "")
