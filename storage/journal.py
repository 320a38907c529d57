"""The write journal: records the database has not taken yet, in order, on disk.

While the database is down or slow, the persistence actor appends each batch here instead,
one JSON object per line (``storage.rows`` records, tagged by ``kind``), and replays the lines
in order once it is back, then truncates the file. Replaying twice is harmless: every write
is idempotent.

**fsync policy.** A batch that carries a critical write (a caller awaits it) is ``fdatasync``-ed
before that caller is answered. A batch of background writes only is written (so a killed
*process* loses nothing: the data is in the kernel's page cache) and ``fdatasync``-ed at most
``fsync_interval`` seconds later, by the next append or the actor's periodic tick. So a crash
of the whole *machine* can lose at most that interval of background writes, and never a write
a caller was told is safe.

**One file per process.** Each process ("node") creates its own file, ``journal-<ns>-<pid>.jsonl``,
whose first line names the node, and holds an exclusive ``flock`` on it until it exits. The
kernel drops the lock when the process dies, however it dies, so at start-up a file whose lock
can be taken is proof that its writer is dead (:func:`find_orphans`): its lines are replayed
and the node it names is treated as dead. A file still locked belongs to a live process and
is left alone.

**Bound.** The file never grows past ``max_bytes``, whatever kind of record is appended. From
three quarters of it on the journal is :attr:`Journal.full`: new work must then be refused
(``StorageUnavailable``), and the last quarter is kept for the records of work already
accepted (task results, session ends, usage). A record that would take the file past
``max_bytes`` is not appended: :meth:`Journal.append` returns a ``StorageUnavailable`` for it
saying so (or, for a record larger than the whole journal, that it can never fit), and the
persistence actor tells its writer or, for a background write, logs it as lost.

Records the database refuses outright (a constraint or a bad value) are never dropped: they
are appended, with the error, to ``rejected.jsonl`` in the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import ValidationError

from storage.errors import StorageUnavailable
from storage.rows import RECORD, Record

log = structlog.get_logger("storage.journal")

FORMAT = 1
REJECTED_FILE = "rejected.jsonl"
_BLOCK = 1 << 20


@dataclass(slots=True)
class _Segment:
    """One file of the journal. ``start``: the logical position of its first record."""

    path: Path
    fd: int
    header_end: int
    size: int
    start: int

    @property
    def end(self) -> int:
        """The logical position after its last record."""
        return self.start + self.size - self.header_end


class Journal:
    """This process's journal, in segment files.

    **Two threads.** One thread appends (and fsyncs): the persistence actor's. Another reads
    and advances (the database writer, :mod:`actors.persistence.database_writer`), or the
    start-up code before either runs. A lock guards the segment list and the counters; the
    appender's ``fdatasync`` runs outside it, on a segment only the appender may retire.

    **Positions** are logical: bytes of records ever appended (headers excluded), so they stay
    valid across truncation and rotation. ``appended`` is the end of what was written,
    ``synced`` of what was fsynced, ``committed`` of what the database has (advanced by the
    reader).

    **Segments.** Appends go to the last segment; past ``segment_bytes`` the next append opens a
    new one, so that a journal that is never fully caught up (steady load) still shrinks: a
    segment whose records are all in the database is deleted, and the last one is truncated
    back to its header. The journal outlives any one incarnation of the persistence actor.
    """

    def __init__(
        self,
        directory: Path,
        first: _Segment,
        *,
        node_id: str,
        max_bytes: int,
        fsync_interval: float,
        segment_bytes: int,
    ) -> None:
        self.directory = directory
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: list[_Segment] = [first]
        self._committed = 0
        self._synced = 0
        self._pending_records = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._closed = False

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        node_id: str,
        max_bytes: int = 128 * 1024 * 1024,
        fsync_interval: float = 1.0,
        segment_bytes: int = 8 * 1024 * 1024,
    ) -> Journal:
        """Create and lock this process's journal (its first segment) in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        first = _create_segment(directory, node_id, start=0)
        return cls(
            directory,
            first,
            node_id=node_id,
            max_bytes=max_bytes,
            fsync_interval=fsync_interval,
            # At most an eighth of the bound: the oldest segment, part in the database and
            # part not, is the disk the bound counts without its records being pending.
            segment_bytes=max(4096, min(segment_bytes, max_bytes // 8)),
        )

    @property
    def path(self) -> Path:
        """The segment appends go to now."""
        return self._segments[-1].path

    @property
    def paths(self) -> list[Path]:
        with self._lock:
            return [segment.path for segment in self._segments]

    @property
    def appended(self) -> int:
        return self._segments[-1].end

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def pending(self) -> bool:
        """Records wait here that the database has not taken yet."""
        return self._committed < self.appended

    @property
    def pending_records(self) -> int:
        return self._pending_records

    @property
    def size_bytes(self) -> int:
        """Bytes on disk, headers included: what ``max_bytes`` bounds."""
        with self._lock:
            return sum(segment.size for segment in self._segments)

    @property
    def admit_bytes(self) -> int:
        """The size from which new work is refused: three quarters of ``max_bytes``."""
        return self.max_bytes - self.max_bytes // 4

    @property
    def full(self) -> bool:
        """New work must be refused: the rest of the bound is for work already accepted."""
        return self.size_bytes >= self.admit_bytes

    # --- the appender's side ----------------------------------------------------------------

    def append(self, records: Sequence[Record], *, durable: bool) -> dict[int, StorageUnavailable]:
        """Append ``records`` in one write; ``durable``: fdatasync before returning.

        Returns the records left out, by position, each with the reason: those that would
        have taken the journal past ``max_bytes``. The others are appended, in order; their
        end is :attr:`appended`.
        """
        refused: dict[int, StorageUnavailable] = {}
        if records:
            encoded = [record.model_dump_json().encode() + b"\n" for record in records]
            self._maybe_rotate()
            with self._lock:
                size = total = sum(segment.size for segment in self._segments)
                lines: list[bytes] = []
                for index, line in enumerate(encoded):
                    if size + len(line) > self.max_bytes:
                        refused[index] = self._refusal(records[index].kind, len(line), size)
                        continue
                    lines.append(line)
                    size += len(line)
                if lines:
                    last = self._segments[-1]
                    try:
                        _write_all(last.fd, b"".join(lines))
                    except OSError:
                        # A write that failed part-way (disk full) must not leave a partial
                        # line for the next append to follow: cut back to where it began.
                        with contextlib.suppress(OSError):
                            os.ftruncate(last.fd, last.size)
                        raise
                    last.size += size - total
                    self._pending_records += len(lines)
                    self._dirty = True
        if durable:
            self.sync()
        else:
            self.sync_if_due()
        return refused

    def _maybe_rotate(self) -> None:
        last = self._segments[-1]
        if last.size < self.segment_bytes or last.size == last.header_end:
            return
        # The old segment is fsynced before it is left: from now on only the new one is
        # written and synced by this thread, and the reader may delete the old one.
        self.sync()
        segment = _create_segment(self.directory, self.node_id, start=last.end)
        with self._lock:
            self._segments.append(segment)

    def _refusal(self, kind: str, length: int, size: int) -> StorageUnavailable:
        if self._segments[-1].header_end + length > self.max_bytes:
            return StorageUnavailable(
                f"storage unavailable: a {kind} record of {length} bytes can never fit the "
                f"write journal (bound {self.max_bytes} bytes)"
            )
        return StorageUnavailable(
            f"storage unavailable: the database is behind and the write journal is full "
            f"({size} of {self.max_bytes} bytes): a {kind} record of {length} bytes was not kept"
        )

    def sync(self) -> None:
        """fdatasync what was appended (the appender's thread only)."""
        end = self.appended
        if self._dirty:
            os.fdatasync(self._segments[-1].fd)
            self._dirty = False
        self._synced = max(self._synced, end)
        self._last_sync = time.monotonic()

    def sync_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    # --- the reader's side ------------------------------------------------------------------

    def read(self, max_records: int) -> tuple[list[Record], int]:
        """The next records the database does not have yet (at most ``max_records``, from one
        segment) and the position after them; pass both to :meth:`advance` once the
        database has them."""
        with self._lock:
            segment = next((s for s in self._segments if s.end > self._committed), None)
            if segment is None:
                return [], self._committed
            offset = segment.header_end + (self._committed - segment.start)
            size, fd, base = segment.size, segment.fd, segment.start - segment.header_end
        lines, end, _ = _read_lines(fd, offset, size, max_records)
        return _parse(lines, self.directory, source=segment.path.name), base + end

    def advance(self, position: int, records: int) -> None:
        """The records before ``position`` are in the database: forget them. Segments left
        with nothing pending are deleted; the last one is truncated back to its header."""
        with self._lock:
            self._committed = max(self._committed, position)
            self._pending_records = max(0, self._pending_records - records)
            while len(self._segments) > 1 and self._segments[0].end <= self._committed:
                done = self._segments.pop(0)
                os.close(done.fd)
                done.path.unlink(missing_ok=True)
            last = self._segments[-1]
            if len(self._segments) == 1 and last.end <= self._committed:
                os.ftruncate(last.fd, last.header_end)
                last.start, last.size = self._committed, last.header_end
                self._pending_records = 0

    def set_aside(self, rejected: Sequence[tuple[Record, Exception]]) -> None:
        """Keep records the database refused, with the reason, in ``rejected.jsonl``."""
        set_aside(self.directory, rejected, node_id=self.node_id)

    def close(self) -> None:
        """Sync and release the files; delete them if nothing is pending (a clean stop).
        Files left behind are replayed by the next start."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
            if not self.pending:
                for segment in self._segments:
                    segment.path.unlink(missing_ok=True)
        finally:
            for segment in self._segments:
                os.close(segment.fd)


def _create_segment(directory: Path, node_id: str, *, start: int) -> _Segment:
    """A new segment file, locked, with its header, fsynced with its directory."""
    path = directory / f"journal-{time.time_ns()}-{os.getpid()}.jsonl"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        header = {
            "journal": FORMAT,
            "node_id": node_id,
            "pid": os.getpid(),
            "created_at": datetime.now(UTC).isoformat(),
        }
        _write_all(fd, json.dumps(header).encode() + b"\n")
        os.fsync(fd)
        _fsync_directory(directory)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    size = os.fstat(fd).st_size
    return _Segment(path, fd, size, size, start)


@dataclass
class OrphanJournal:
    """The journal of a process that is provably dead (its lock was free); we hold it now."""

    path: Path
    node_id: str | None
    fd: int

    def chunks(self, max_records: int) -> Iterator[list[Record]]:
        """Its records in order, ``max_records`` at a time. A torn last line (the machine
        died mid-write) was never acknowledged to anyone and is skipped."""
        offset = self._header_end()
        size = os.fstat(self.fd).st_size
        while offset < size:
            lines, offset, torn = _read_lines(self.fd, offset, size, max_records)
            if torn:
                log.warning("journal.torn_tail", file=self.path.name, bytes=len(torn))
                offset = size
            yield _parse(lines, self.path.parent, source=self.path.name)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _header_end(self) -> int:
        lines, end, _ = _read_lines(self.fd, 0, os.fstat(self.fd).st_size, 1)
        return end if lines else 0


def find_orphans(directory: Path, *, exclude: Collection[Path] = ()) -> list[OrphanJournal]:
    """Journal files in ``directory`` whose writer is dead, oldest first (a dead process's
    segments in the order it wrote them), each locked by us now."""
    found = []
    for path in sorted(directory.glob("journal-*.jsonl"), key=_creation_order):
        if path in exclude:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its owner removed it on a clean stop just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live process holds it
            continue
        found.append(OrphanJournal(path, _header_node(fd), fd))
    return found


def set_aside(
    directory: Path, rejected: Sequence[tuple[Record, Exception]], *, node_id: str | None
) -> None:
    if not rejected:
        return
    now = datetime.now(UTC).isoformat()
    lines = [
        json.dumps(
            {
                "rejected_at": now,
                "node_id": node_id,
                "error": str(error),
                "record": json.loads(record.model_dump_json()),
            }
        ).encode()
        + b"\n"
        for record, error in rejected
    ]
    fd = os.open(
        directory / REJECTED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    try:
        _write_all(fd, b"".join(lines))
        os.fsync(fd)
    finally:
        os.close(fd)
    for record, error in rejected:
        log.error("journal.record_rejected", kind=record.kind, error=str(error))


def _creation_order(path: Path) -> tuple[int, str]:
    parts = path.stem.split("-")
    try:
        return int(parts[1]), path.name
    except (IndexError, ValueError):
        return 0, path.name


def _header_node(fd: int) -> str | None:
    lines, _, _ = _read_lines(fd, 0, os.fstat(fd).st_size, 1)
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        header = json.loads(lines[0])
        node_id = header.get("node_id")
        return node_id if isinstance(node_id, str) else None
    return None


def _read_lines(fd: int, start: int, end: int, max_lines: int) -> tuple[list[bytes], int, bytes]:
    """Up to ``max_lines`` complete lines from ``[start, end)``: the lines, the offset after the
    last one, and the incomplete tail if the range ended inside a line."""
    lines: list[bytes] = []
    offset = start
    buffer = b""
    read_at = start
    while len(lines) < max_lines and read_at < end:
        block = os.pread(fd, min(_BLOCK, end - read_at), read_at)
        if not block:
            break
        read_at += len(block)
        buffer += block
        begin = 0
        while len(lines) < max_lines:
            newline = buffer.find(b"\n", begin)
            if newline < 0:
                break
            lines.append(buffer[begin:newline])
            begin = newline + 1
        offset += begin
        buffer = buffer[begin:]
    torn = buffer if read_at >= end and len(lines) < max_lines else b""
    return lines, offset, torn


def _parse(lines: list[bytes], directory: Path, *, source: str) -> list[Record]:
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(RECORD.validate_json(line))
        except ValidationError as exc:
            problem = str(exc)[:200]
        else:
            continue
        # Not ours to judge, and not to lose: keep the raw line beside the rejected ones.
        log.error("journal.unreadable_line", file=source, error=problem)
        _keep_unreadable(directory, line, source)
    return records


def _keep_unreadable(directory: Path, line: bytes, source: str) -> None:
    entry = {
        "rejected_at": datetime.now(UTC).isoformat(),
        "source": source,
        "raw": line.decode("utf-8", "replace"),
    }
    with (directory / REJECTED_FILE).open("a") as out:
        out.write(json.dumps(entry) + "\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
