"""The database writer: the journal's records into Postgres, behind the answers.

Every record a node keeps is appended to its journal first (:mod:`storage.journal`), by the
persistence actor; this writer, a thread the actor owns, takes them from there to the database
in order, in batches of up to ``max_batch`` records, one transaction each
(:func:`storage.writes.write_batch`), and advances the journal past each batch it commits.
Writes to a database across a network take several round trips per batch: on a thread of
their own they never hold up an append, an fsync or an answer.

**What it writes.** The actor hands it each appended span (:class:`Span`) with the records
still in memory, so that a database that keeps up costs no re-reading. A span it cannot use
as it is (one that starts past what the database has, after a failure, or one handed over
without its records because the writer was far behind) is read back from the journal
instead, ``replay_chunk`` records at a time, with the replay-safe attempt. Either way the
database sees records in the order they were appended, and a record written twice (a crash
between a commit and the journal's advance) is a duplicate, which every write is built to be.

**When the database fails** the storage breaker opens (:mod:`storage.breaker`): the writer
drops the records it holds in memory (they are in the journal), waits for the breaker's
trial, and replays from the journal. It never stops the actor from appending; the journal's
bound is what eventually refuses new work.

**Reports.** After every commit and every failure it calls ``report`` (any thread may): the
actor's answer-givers read :attr:`committed` and :attr:`database`, both safe to read from
another thread.

**Lifetime.** :meth:`start` starts the thread; :meth:`stop` asks it to write what it still can
(one forced trial if the database is down) and joins it. The thread never outlives its actor.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
import structlog

from actors.persistence.protocol import PersistenceConfig
from storage.breaker import BreakerState, ConsecutiveFailureBreaker
from storage.connection import Connector
from storage.errors import WriteRejected
from storage.journal import Journal
from storage.rows import Record
from storage.writes import BatchResult, write_batch

log = structlog.get_logger("persistence")


@dataclass(frozen=True, slots=True)
class Span:
    """Records appended to the journal between ``start`` and ``end`` (logical positions).

    ``records`` is ``None`` when the actor handed the span over without them (the writer was
    behind): they are then read back from the journal. ``owners``: the records someone
    awaits, by index in ``records``, with the shipment and position they came from, so that
    a failure to write one reaches its writer.
    """

    start: int
    end: int
    records: Sequence[Record] | None
    owners: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    #: Someone waits for these records to be in the database: write at once, no lingering.
    urgent: bool = False
    #: When it was handed over (``time.monotonic()``), for the linger.
    handed_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    largest_batch: int = 0
    records_written: int = 0
    records_replayed: int = 0
    conflicts: int = 0
    rejected: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """What one report says: the database has everything before ``committed``; ``errors``
    are the records that did not apply, by (shipment, position), when written from memory."""

    committed: int
    errors: dict[tuple[int, int], Exception] = field(default_factory=dict)
    #: The database failed (the breaker is open): nothing more is written until its trial.
    failed: bool = False
    #: When the failed attempt started (``time.monotonic()``): a forced flush waits for an
    #: attempt that started after it asked.
    attempt_started: float = 0.0


_STOP = object()


class DatabaseWriter:
    """A thread that writes the journal's records to the database (module doc)."""

    def __init__(
        self,
        database_url: str,
        journal: Journal,
        config: PersistenceConfig,
        report: Callable[[Committed], None],
    ) -> None:
        self._journal = journal
        self._config = config
        self._report = report
        self._connector = Connector(database_url, connect_timeout=config.connect_timeout)
        self._breaker = ConsecutiveFailureBreaker(
            failure_threshold=config.breaker_threshold,
            reset_after=config.breaker_reset,
            max_reset_after=config.breaker_max_reset,
            slow_call=config.slow_commit,
        )
        self._inbox: queue.SimpleQueue[Span | object] = queue.SimpleQueue()
        self._held: list[Span] = []
        self._held_records = 0
        #: The end of the last span handed over: the records up to it are this writer's to
        #: write. What the journal holds past it is still on its way here (in the inbox), so
        #: the writer waits for it rather than reading it back. What a previous incarnation
        #: left is this one's from the start.
        self._due = journal.appended
        #: Records handed over and not yet written or dropped (read by the actor: a hint).
        #: Changed by both threads, so under a lock (``+=`` is not atomic).
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        #: When the write in progress started (``time.monotonic()``), read by the actor.
        self._attempt_started: float | None = None
        #: The write in progress was cut at its deadline (set by the actor's thread).
        self._cut = False
        self._force = threading.Event()
        #: Set when a lingering writer must stop lingering: an urgent span, a full batch, a
        #: forced trial, the stop. Other spans do not wake it (see ``_linger``).
        self._hurry = threading.Event()
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="persistence-database", daemon=True)

    # --- the actor's side -------------------------------------------------------------------

    @property
    def database(self) -> BreakerState:
        """The storage breaker's state: closed = up, open = down, half_open = trying."""
        return self._breaker.state

    @property
    def backlog(self) -> int:
        return self._backlog

    def start(self) -> None:
        self._thread.start()

    def hand(self, span: Span) -> None:
        """Write this span once everything before it is written."""
        if span.records is not None:
            self._count(len(span.records))
        self._inbox.put(span)
        # After the put: a writer woken by the event finds the span in its inbox.
        if span.urgent or self._backlog >= self._config.max_batch:
            self._hurry.set()

    def unstick(self) -> None:
        """Cut the connection of a write that has taken longer than ``write_deadline`` (any
        thread; the actor calls it every tick and while it waits for the thread to stop): the
        write then fails as the database's, the breaker opens, and what waits for the
        database falls back as it does for any outage."""
        started = self._attempt_started
        if started is not None and time.monotonic() - started > self._config.write_deadline:
            log.warning("persistence.write_cut", after_s=round(time.monotonic() - started, 1))
            self._attempt_started = None  # once per write
            self._cut = True  # a database that stopped answering: no second try at once
            self._connector.abort()

    def force_trial(self) -> None:
        """Try the database now, whatever the breaker's schedule (an explicit flush)."""
        self._force.set()
        self._inbox.put(None)
        self._hurry.set()

    def stop(self) -> None:
        """Write what can be written (one forced trial if the database is down), then end the
        thread and close the connection. Blocks until then: at most ``write_deadline`` per
        remaining batch (a write that takes longer is cut), one connect timeout if the
        database does not answer at all."""
        self._inbox.put(_STOP)
        self._hurry.set()
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
            self.unstick()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        try:
            while True:
                stopping = self._take(block=not stopping) or stopping
                if stopping:
                    self._breaker.force_trial()
                    self._write_while_allowed()
                    return
                stopping = self._linger()
                self._write_while_allowed()
        except Exception:
            # A bug: the records are in the journal, the next incarnation replays them.
            log.exception("persistence.database_writer_failed")
        finally:
            self._connector.close()

    def _take(self, *, block: bool) -> bool:
        """Move handed spans into ``_held``; wait for one only if there is nothing to do.
        ``True`` once asked to stop."""
        wait = self._wait_time() if block else 0.0
        try:
            item = self._inbox.get(timeout=wait) if wait != 0.0 else self._inbox.get_nowait()
        except queue.Empty:
            return False
        stop = False
        while True:
            stop = self._receive(item) or stop
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return stop

    def _receive(self, item: object) -> bool:
        """Hold a span; ``True`` for the stop signal."""
        if isinstance(item, Span):
            self._due = max(self._due, item.end)
            # Only spans with their records are worth holding, and only while the database
            # takes them: the rest is read back from the journal, so what this thread holds
            # stays bounded through an outage of any length.
            if item.records is not None:
                if self._breaker.state is BreakerState.CLOSED:
                    self._held.append(item)
                    self._held_records += len(item.records)
                else:
                    self._drop(item)
        return item is _STOP

    def _linger(self) -> bool:
        """While nobody waits for the database, wait up to ``writer_linger`` after the oldest
        held span for more: a call's intent and its final state then go in one transaction
        (one row, folded), and the database commits (and fsyncs its WAL) far less often than
        the journal. ``True`` if asked to stop meanwhile.

        It sleeps through the window instead of waking for each span handed meanwhile: at
        a thousand calls a second, a wake-up per span cost this thread (and, through the
        GIL, the event loop) a switch each, for nothing (issue 17). What must end the
        window early sets ``_hurry`` (``hand``, ``force_trial``, ``stop``)."""
        linger = self._config.writer_linger
        while (
            linger > 0
            and self._held
            and self._breaker.state is BreakerState.CLOSED
            and self._held_records < self._config.max_batch
            and not any(span.urgent for span in self._held)
        ):
            remaining = self._held[0].handed_at + linger - time.monotonic()
            if remaining <= 0:
                return self._take(block=False)
            hurried = self._hurry.wait(remaining)
            # Cleared before the inbox is read: a span put before a later set() is seen
            # now or wakes the next wait.
            self._hurry.clear()
            if self._take(block=False):
                return True
            if not hurried:
                return False
        return False

    def _wait_time(self) -> float | None:
        """How long to block for new spans: forever when everything is written, until the
        breaker's trial when the database is down, not at all otherwise."""
        if self._force.is_set():
            self._force.clear()
            self._breaker.force_trial()
            return 0.0
        if not self._pending():
            return None
        if self._breaker.state is BreakerState.CLOSED:
            return 0.0
        return max(self._breaker.retry_in, 0.005)

    def _pending(self) -> bool:
        return self._journal.committed < self._due

    def _write_while_allowed(self) -> None:
        while self._pending() and self._breaker.allow():
            if not self._write_one():
                return

    def _write_one(self) -> bool:
        """One transaction: the held spans that continue the database's position, or a chunk
        read back from the journal. ``False`` if the database failed."""
        committed = self._journal.committed
        spans = self._usable(committed)
        started = time.monotonic()
        if spans:
            records: list[Record] = []
            owners: dict[int, tuple[int, int]] = {}
            for span in spans:
                owners.update((len(records) + i, owner) for i, owner in span.owners.items())
                records.extend(span.records or ())
            end = spans[-1].end
            replay = False
        else:
            records, end = self._journal.read(self._config.replay_chunk)
            owners = {}
            replay = True
        self._attempt_started = started
        try:
            result = self._write_batch(records, replay=replay)
        except psycopg.Error as exc:
            self._attempt_started = None
            self._failed(exc, started)
            return False
        except Exception as exc:
            self._attempt_started = None
            # A bug, not the database: these records would fail again. Keep them aside
            # rather than retrying forever, and go on.
            log.exception("persistence.batch_failed", records=len(records))
            rejected = WriteRejected(f"internal error writing the batch: {exc!r}")
            self._set_aside([(record, rejected) for record in records])
            result_errors: dict[int, Exception] = dict.fromkeys(range(len(records)), rejected)
            self._advance(spans, end, len(records))
            self._report(Committed(end, _owned(result_errors, owners)))
            return True
        self._attempt_started = None
        self._breaker.record(ok=True, duration=time.monotonic() - started)
        if result.rejoined is not None:
            # Another node took this one for dead (paused, or cut off from the database past
            # the node timeout) and swept it; its heartbeat has just made it alive again.
            # The tasks the sweep marked interrupted keep that mark until their final states,
            # written by this node, supersede it (storage/writes.py).
            log.warning(
                "membership.rejoined",
                node_id=self._journal.node_id,
                swept_by=result.rejoined.swept_by,
                swept_at=result.rejoined.swept_at.isoformat() if result.rejoined.swept_at else None,
                swept_tasks=result.rejoined.swept_tasks,
                swept_sessions=result.rejoined.swept_sessions,
            )
        stats = self.stats
        stats.batches += 1
        stats.largest_batch = max(stats.largest_batch, len(records))
        if replay:
            stats.records_replayed += len(records)
            for index, conflict in result.conflicts.items():
                log.warning(
                    "persistence.replay_conflict", kind=records[index].kind, error=str(conflict)
                )
        else:
            stats.records_written += len(records) - len(result.rejected)
        stats.conflicts += len(result.conflicts)
        self._set_aside([(records[i], error) for i, error in result.rejected.items()])
        self._advance(spans, end, len(records))
        self._report(Committed(end, _owned(result.errors, owners)))
        return True

    def _write_batch(self, records: list[Record], *, replay: bool) -> BatchResult:
        """``write_batch`` on the connection, tried once more on a new one if the connection
        it held had died while idle (the server restarted, a proxy or NAT dropped it): that
        says nothing about the database now. Every write is idempotent."""
        reused = self._connector.is_open
        self._cut = False
        try:
            return write_batch(
                self._connector.connection(),
                records,
                replay=replay,
                statement_timeout=self._config.statement_timeout,
                node_id=self._journal.node_id,
            )
        except psycopg.OperationalError:
            if not reused or self._cut:
                raise
            self._connector.discard()
            return write_batch(
                self._connector.connection(),
                records,
                replay=replay,
                statement_timeout=self._config.statement_timeout,
                node_id=self._journal.node_id,
            )

    def _usable(self, committed: int) -> list[Span]:
        """Held spans that start exactly where the database is, with their records, up to
        ``max_batch`` records; spans already behind the database are dropped."""
        while self._held and self._held[0].end <= committed:
            self._unhold(self._held.pop(0))
        usable: list[Span] = []
        count = 0
        position = committed
        for span in self._held:
            if span.start != position or span.records is None:
                break
            if usable and count + len(span.records) > self._config.max_batch:
                break
            usable.append(span)
            count += len(span.records)
            position = span.end
        return usable

    def _advance(self, spans: list[Span], end: int, records: int) -> None:
        self._journal.advance(end, records)
        for span in spans:
            self._held.remove(span)
            self._unhold(span)

    def _unhold(self, span: Span) -> None:
        self._held_records -= len(span.records or ())
        self._drop(span)

    def _drop(self, span: Span) -> None:
        """Forget a span handed over (written, behind the database, or left to the journal)."""
        if span.records is not None:
            self._count(-len(span.records))

    def _count(self, records: int) -> None:
        with self._backlog_lock:
            self._backlog += records

    def _failed(self, exc: psycopg.Error, started: float) -> None:
        self._connector.discard()
        was = self._breaker.state
        self._breaker.record(ok=False)
        self.stats.last_error = f"{type(exc).__name__}: {exc}".strip()
        log.warning(
            "persistence.database_unavailable",
            error=self.stats.last_error[:300],
            database=self._breaker.state,
            was=was,
            retry_in=round(self._breaker.retry_in, 3),
        )
        # What is held is in the journal: replayed from there, memory stays bounded.
        for span in self._held:
            self._unhold(span)
        self._held.clear()
        self._report(Committed(self._journal.committed, failed=True, attempt_started=started))

    def _set_aside(self, rejected: list[tuple[Record, Exception]]) -> None:
        if not rejected:
            return
        self.stats.rejected += len(rejected)
        try:
            self._journal.set_aside(rejected)
        except OSError:
            log.exception("persistence.set_aside_failed", records=len(rejected))


def _owned(
    errors: dict[int, Exception], owners: Mapping[int, tuple[int, int]]
) -> dict[tuple[int, int], Exception]:
    """The errors someone awaits, by (shipment, position); the others were logged."""
    return {owners[index]: error for index, error in errors.items() if index in owners}
