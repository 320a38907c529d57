"""The persistence actor: every record a node keeps goes through it, journal first.

A pykka thread, because psycopg's async API is asyncio-only (trio support is the open issue
psycopg/psycopg#29); one appender also serialises records, so the journal, and after it the
database, see them in the order sessions sent them.

**Journal first.** Every shipment is appended to the node's journal (:mod:`storage.journal`),
then handed to the :class:`~actors.persistence.database_writer.DatabaseWriter`, a thread this
actor owns, which writes the journal's records to the database in order, behind. So an answer
never waits on a database round trip unless its writer asked for one: each awaited record says
how far it must have gone (:class:`~actors.persistence.protocol.Point`: written, synced,
committed, in the database), and the client answers it when the :class:`Progress` this actor
and the writer report says it has. What a call waits for is the node's durability setting
(:mod:`storage.durability`), chosen by the session's call runner.

**Group commit without a timer.** A pykka thread blocked on its inbox cannot "wait a few ms",
and a timer thread would be an unowned thread. Instead, a shipment (:class:`Ship`) is added to
the batch and, if none is pending and more messages wait in the inbox, the actor tells
*itself* a flush. Its inbox is FIFO, so the flush runs after every shipment already queued:
the batch is whatever arrived while the previous batch was being appended and fsynced. At low
load (an empty inbox) a shipment is appended at once, with no message to itself; under load,
batches grow with the fsync time. One ``write(2)`` per
batch, and one ``fdatasync`` if any of its shipments waits for one.

**Session activity** (:class:`~storage.rows.SessionActivity`) sent in the background is
coalesced per session and appended every ``sync_interval`` (and on flush and stop); its
fields only grow, so writing the latest is writing all of them.

Stopping (``stop()``) is queued behind every shipment already sent; :meth:`on_stop` appends
what is held and lets the writer write what it can. On a crash (:meth:`on_failure`), held
shipments are journaled if possible, else failed so that their callers know; the journal (and
so everything appended) is the next incarnation's, whose writer replays it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, assert_never

import pykka
import structlog
from pydantic import JsonValue

from actors.persistence.database_writer import Committed, DatabaseWriter, Span
from actors.persistence.protocol import (
    ADMISSIONS,
    Flush,
    GetStatus,
    PersistenceConfig,
    Point,
    Progress,
    Ship,
    Tick,
)
from runtime import trace
from runtime.bridge import CallbackFuture
from runtime.pykka_service import ServiceActor
from runtime.status_model import PersistenceStatus, database_of
from storage.breaker import BreakerState
from storage.errors import StorageUnavailable
from storage.journal import Journal
from storage.rows import NodeHeartbeat, Record, SessionActivity

log = structlog.get_logger("persistence")


@dataclass(frozen=True, slots=True)
class _FlushSoon:
    """Self-told: append the batch once the shipments queued before this one are in it."""


@dataclass(frozen=True, slots=True)
class _Written:
    """Told by the database writer: it committed up to a position, or failed."""

    report: Committed


_Message: TypeAlias = Ship | Flush | Tick | GetStatus | _FlushSoon | _Written


@dataclass(slots=True)
class _Held:
    """A shipment in the batch: the records still to append, and where each came from."""

    ship: Ship
    records: list[Record] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    errors: dict[int, Exception] = field(default_factory=dict)


@dataclass(slots=True)
class _Flushing:
    """An explicit flush waiting for the database to reach ``target``, or to fail: any
    failure, or, ``forced``, a failure of an attempt that started after ``asked``."""

    target: int
    reply: CallbackFuture[PersistenceStatus]
    forced: bool
    asked: float


class PersistenceActor(ServiceActor[_Message]):
    """Appends records to the journal, answers, and has its writer take them to the database.

    ``journal`` is lent, not owned: it outlives any one incarnation of this actor, so a
    restarted actor continues the same journal (its writer replays what the previous one had
    not written). The node's id is the journal's.
    """

    def __init__(
        self,
        database_url: str,
        journal: Journal,
        *,
        config: PersistenceConfig | None = None,
    ) -> None:
        super().__init__()
        self._config = config = config or PersistenceConfig()
        self._journal = journal
        self._writer = DatabaseWriter(database_url, journal, config, self._on_committed)
        self._batch: list[_Held] = []
        self._batch_records = 0
        self._activity: dict[str, SessionActivity] = {}
        self._flush_told = False
        self._journal_broken = False
        #: Every client's listener seen so far (one per client; a node has one). Replaced, never
        #: mutated, so that the database writer's thread can read it at any time.
        self._listeners: tuple[Callable[[Progress], None], ...] = ()
        self._flushing: list[_Flushing] = []
        self._last_sync = time.monotonic()
        self._last_heartbeat = float("-inf")
        self._records_journaled = 0

    # --- pykka hooks ------------------------------------------------------------------------

    def on_start(self) -> None:
        self._writer.start()

    def handle(self, message: _Message) -> PersistenceStatus | CallbackFuture[Any] | None:
        match message:
            case Ship():
                # One trace event per shipment, listing every trace it carries: each writer's
                # timeline shows the persistence step and how long the records waited for it.
                with trace.handling(
                    "/root/persistence",
                    "Ship",
                    postmark=message.marks,
                    records=len(message.records),
                ):
                    self._accept(message)
            case _FlushSoon():
                self._flush_told = False
                self._flush()
            case _Written():
                self._written(message.report)
            case Tick():
                self._tick(message.snapshot)
                return self._status()
            case Flush():
                return self._explicit_flush(message)
            case GetStatus():
                return self._status()
            case _:
                assert_never(message)
        return None

    def on_stop(self) -> None:
        self._flush(self._take_activity())
        self._journal.sync()
        self._writer.stop()
        self._answer_flushes(everything=True)
        log.info(
            "persistence.stopped",
            journal_pending=self._journal.pending_records,
            records_written=self._writer.stats.records_written,
        )

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # Not expected (every handler contains its errors), but if it happens, what is held
        # must not vanish: journal it, or tell its writers.
        try:
            self._flush(self._take_activity(), sync=True)
        except Exception:
            log.exception("persistence.records_lost", records=self._batch_records)
            failure = pykka.ActorDeadError("persistence actor crashed")
            for held in self._batch:
                if held.ship.waits:
                    errors: dict[tuple[int, int], Exception] = {
                        (held.ship.shipment_id, p): failure for p in held.ship.waits
                    }
                    held.ship.listener(self._progress(errors=errors))
        self._writer.stop()

    # --- shipments and batches --------------------------------------------------------------

    def _accept(self, ship: Ship) -> None:
        if ship.listener not in self._listeners:
            self._listeners = (*self._listeners, ship.listener)
        held = _Held(ship)
        for position, record in enumerate(ship.records):
            awaited = position in ship.waits
            if awaited and isinstance(record, ADMISSIONS) and not self._available():
                held.errors[position] = StorageUnavailable.journal_full(
                    f"{self._journal.size_bytes} bytes"
                )
            elif not awaited and isinstance(record, SessionActivity):
                self._coalesce(record)
            else:
                held.records.append(record)
                held.positions.append(position)
        self._batch.append(held)
        self._batch_records += len(held.records)
        if self._batch_records >= self._config.max_batch or self._inbox_empty():
            # Nothing else is waiting to join the batch: append now, without a message to
            # ourselves (a queue round trip on every write at low load).
            self._flush()
        elif not self._flush_told:
            self._flush_told = self.tell_self(_FlushSoon())

    def _inbox_empty(self) -> bool:
        inbox = self.actor_inbox
        return isinstance(inbox, queue.Queue) and inbox.empty()

    def _coalesce(self, record: SessionActivity) -> None:
        old = self._activity.get(record.session_id)
        if old is not None:
            record = SessionActivity(
                session_id=record.session_id,
                last_activity=max(old.last_activity, record.last_activity),
                tool_calls=max(old.tool_calls, record.tool_calls),
                tool_errors=max(old.tool_errors, record.tool_errors),
            )
        self._activity[record.session_id] = record

    def _take_activity(self) -> list[Record]:
        records: list[Record] = list(self._activity.values())
        self._activity.clear()
        self._last_sync = time.monotonic()
        return records

    def _flush(self, extra: Sequence[Record] = (), *, sync: bool = False) -> None:
        """Append the batch (plus ``extra``), fsync it if a writer waits for that, answer its
        shipments, and hand it to the database writer."""
        held, self._batch, self._batch_records = self._batch, [], 0
        records = [record for h in held for record in h.records]
        records.extend(extra)
        if not records and not held:
            return
        sync = sync or any(h.ship.sync for h in held)
        if not sync and self._writer.database is not BreakerState.CLOSED:
            # While the database is down, a commit waits for the fsync instead.
            sync = any(Point.COMMITTED in h.ship.waits.values() for h in held)
        start = self._journal.appended
        refused = self._append(records, sync=sync)
        end = self._journal.appended
        kept, owners, errors = _sort(held, records, refused)
        self._records_journaled += len(kept)
        if kept:
            # Far behind, the writer reads the records back from the journal: memory stays
            # bounded whatever the database's speed.
            behind = self._writer.backlog >= self._config.max_held_records
            urgent = any(
                point in (Point.COMMITTED, Point.DATABASE)
                for h in held
                for point in h.ship.waits.values()
            )
            self._writer.hand(Span(start, end, None if behind else kept, owners, urgent))
        placed = {h.ship.shipment_id: end for h in held}
        listeners = {id(h.ship.listener): h.ship.listener for h in held}
        progress = self._progress(placed=placed, errors=errors)
        for listener in listeners.values():
            listener(progress)

    def _append(self, records: list[Record], *, sync: bool) -> dict[int, Exception]:
        """Append to the journal; the records left out, by index, with the reason."""
        try:
            refused: dict[int, Exception] = dict(self._journal.append(records, durable=sync))
        except OSError as exc:
            self._journal_broken = True
            lost = StorageUnavailable(f"storage unavailable: journal write failed: {exc}")
            log.exception("persistence.records_lost", records=len(records), error=str(lost))
            return dict.fromkeys(range(len(records)), lost)
        self._journal_broken = False
        return refused

    def _progress(
        self,
        *,
        placed: dict[int, int] | None = None,
        errors: dict[tuple[int, int], Exception] | None = None,
    ) -> Progress:
        journal = self._journal
        return Progress(
            appended=journal.appended,
            synced=journal.synced,
            committed=journal.committed,
            database_down=self._writer.database is not BreakerState.CLOSED,
            available=self._available(),
            placed=placed or {},
            errors=errors or {},
        )

    # --- the database writer's reports (its thread, then ours) -------------------------------

    def _on_committed(self, report: Committed) -> None:
        """The writer's report, on its thread: the client hears it at once (a ``commit``
        write waits for it); the actor only if an explicit flush waits, or the database
        failed and ``committed`` writers must fall back to the journal's fsync."""
        self._tell(self._progress(errors=report.errors))
        if report.failed or self._flushing:
            self.tell_self(_Written(report))

    def _written(self, report: Committed) -> None:
        if report.failed and self._journal.synced < self._journal.appended:
            # Writers waiting for a commit fall back to the fsync while the database is down.
            self._journal.sync()
            self._tell(self._progress())
        self._answer_flushes(failed=report if report.failed else None)

    def _tell(self, progress: Progress) -> None:
        """Report ``progress`` to every client (any thread)."""
        for listener in self._listeners:
            listener(progress)

    def _answer_flushes(self, *, failed: Committed | None = None, everything: bool = False) -> None:
        waiting, self._flushing = self._flushing, []
        for flushing in waiting:
            gave_up = failed is not None and (
                not flushing.forced or failed.attempt_started >= flushing.asked
            )
            if everything or gave_up or self._journal.committed >= flushing.target:
                self.answer(flushing.reply, self._status())
            else:
                self._flushing.append(flushing)

    # --- periodic and explicit work ---------------------------------------------------------

    def _tick(self, snapshot: dict[str, JsonValue] | None = None) -> None:
        self._writer.unstick()
        now = time.monotonic()
        extra: list[Record] = []
        if now - self._last_sync >= self._config.sync_interval:
            extra += self._take_activity()
        # The journal is behind the answers by design: only the database's state says whether
        # a heartbeat is worth writing (one written late, through a backlog, says little).
        healthy = self._writer.database is BreakerState.CLOSED
        if healthy and now - self._last_heartbeat >= self._config.heartbeat_interval:
            self._last_heartbeat = now
            extra.append(NodeHeartbeat(node_id=self._journal.node_id, snapshot=snapshot))
        if extra or self._batch:
            self._flush(extra)
        synced = self._journal.synced
        self._journal.sync_if_due()
        if self._journal.synced != synced:
            self._tell(self._progress())

    def _explicit_flush(self, request: Flush) -> PersistenceStatus | CallbackFuture[Any]:
        asked = time.monotonic()  # before the trial is asked for: its failure counts
        if request.force:
            self._writer.force_trial()
        extra = self._take_activity()
        if request.retire:
            extra.append(NodeHeartbeat(node_id=self._journal.node_id, stopping=True))
        self._flush(extra, sync=True)
        self._tell(self._progress())
        target = self._journal.appended
        down = self._writer.database is not BreakerState.CLOSED
        if down and not request.force:
            return self._status()
        # Registered before the check: the writer, which advances the journal before it
        # reports, then either sees this flush waiting or has already passed the target.
        flushing = _Flushing(target, request.reply, request.force, asked)
        self._flushing.append(flushing)
        if self._journal.committed >= target:
            self._flushing.remove(flushing)
            return self._status()
        return self.defer(request.reply)

    def _available(self) -> bool:
        return not (self._journal.full or self._journal_broken)

    def _status(self) -> PersistenceStatus:
        stats = self._writer.stats
        journal = self._journal
        return PersistenceStatus(
            available=self._available(),
            database=database_of(self._writer.database),
            queue=self.actor_inbox.qsize() if isinstance(self.actor_inbox, queue.Queue) else 0,
            journal_file=str(journal.path),
            journal_bytes=journal.size_bytes,
            journal_pending_records=journal.pending_records,
            journal_full=journal.full,
            appended=journal.appended,
            synced=journal.synced,
            committed=journal.committed,
            batches=stats.batches,
            largest_batch=stats.largest_batch,
            records_written=stats.records_written,
            records_journaled=self._records_journaled,
            records_replayed=stats.records_replayed,
            conflicts=stats.conflicts,
            rejected=stats.rejected,
            last_error=stats.last_error,
        )


def _sort(
    held: list[_Held], records: list[Record], refused: dict[int, Exception]
) -> tuple[list[Record], dict[int, tuple[int, int]], dict[tuple[int, int], Exception]]:
    """Split an append's records: those kept (for the database writer, with the awaited ones'
    owners by index) and the errors awaited ones get, by (shipment, position). Refusals
    nobody awaits are logged once here, grouped."""
    kept: list[Record] = []
    owners: dict[int, tuple[int, int]] = {}
    errors: dict[tuple[int, int], Exception] = {}
    unheard: dict[str, int] = {}
    index = 0
    for h in held:
        ship = h.ship
        errors.update(((ship.shipment_id, p), e) for p, e in h.errors.items())
        for record, position in zip(h.records, h.positions, strict=True):
            error = refused.get(index)
            index += 1
            if error is not None:
                if position in ship.waits:
                    errors[(ship.shipment_id, position)] = error
                else:
                    key = f"{record.kind}: {error}"[:300]
                    unheard[key] = unheard.get(key, 0) + 1
                continue
            if position in ship.waits:
                owners[len(kept)] = (ship.shipment_id, position)
            kept.append(record)
    for record in records[index:]:  # extra: the actor's own records
        if refused.get(index) is None:
            kept.append(record)
        index += 1
    for key, count in unheard.items():
        log.warning("persistence.background_write_failed", error=key, records=count)
    return kept, owners, errors
