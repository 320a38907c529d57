"""The persistence actor: the only code that writes to Postgres.

A pykka thread, because psycopg's async API is asyncio-only (trio support is the open issue
psycopg/psycopg#29); one writer also serialises writes, so the database sees them in the order
sessions sent them.

**Batching without a timer.** A pykka thread blocked on its inbox cannot "wait a few ms", and
a timer thread would be an unowned thread. Instead, a shipment (:class:`Ship`) is added to the
batch and, if none is pending, the actor tells *itself* a flush. Its inbox is FIFO, so the
flush runs after every shipment already queued: the batch is whatever arrived while the
previous batch was committing. At low load that is one shipment, written at once (no added
latency); under load, batches grow with the commit time (group commit). ``max_batch`` caps a
transaction. The client already coalesces all writes of one trio scheduling round into one
shipment, so per-record messaging cost is gone before the actor sees anything.

**Where a batch goes.** To the database, in one transaction (:func:`storage.writes.write_batch`),
while the breaker is closed and the journal is empty. Otherwise, and when a database write
fails, to the journal (:mod:`storage.journal`), where it joins the end of the queue: once
anything is journaled, later batches are journaled behind it until replay catches up, so the
database still receives records in their original order. A replay step (``replay_chunk``
records) runs on each flush and tick while the breaker allows, and continues through
self-told :class:`_Replay` messages, interleaved with new shipments, so writers are answered
(from the journal) while a long backlog drains.

**Answers.** A shipment is answered after its batch is committed, or appended to the journal
(fsynced first if it holds a critical write). Critical writers get per-record errors:
``WriteConflict``, ``WriteRejected``, or ``StorageUnavailable`` for a new session or task
refused because the journal is full.

**Session activity** (:class:`~storage.rows.SessionActivity`) sent in the background is
coalesced per session and written every ``sync_interval`` (and on flush and stop); its fields
only grow, so writing the latest is writing all of them.

Stopping (``stop()``) is queued behind every shipment already sent, and :meth:`on_stop` writes
what is held, so a graceful stop keeps everything accepted. On a crash (:meth:`on_failure`),
held shipments are journaled if possible, else failed so that their callers know.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, assert_never

import psycopg
import pykka
import structlog

from actors.persistence.protocol import (
    ADMISSIONS,
    Flush,
    GetStatus,
    PersistenceConfig,
    Ship,
    ShipmentResult,
    Tick,
)
from runtime import trace
from runtime.pykka_service import ServiceActor
from runtime.status_model import PersistenceStatus, database_of
from storage.breaker import BreakerState, ConsecutiveFailureBreaker
from storage.connection import Connector
from storage.errors import StorageUnavailable, WriteRejected
from storage.journal import Journal
from storage.rows import NodeHeartbeat, Record, SessionActivity
from storage.writes import write_batch

log = structlog.get_logger("persistence")


@dataclass(frozen=True, slots=True)
class _FlushSoon:
    """Self-told: write the batch once the shipments queued before this one are in it."""


@dataclass(frozen=True, slots=True)
class _Replay:
    """Self-told: replay the next journal chunk, after the messages queued so far."""


_Message: TypeAlias = Ship | Flush | Tick | GetStatus | _FlushSoon | _Replay


@dataclass(slots=True)
class _Held:
    """A shipment in the batch: the records still to write, and where each came from."""

    ship: Ship
    records: list[Record] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    errors: dict[int, Exception] = field(default_factory=dict)


@dataclass(slots=True)
class _Stats:
    batches: int = 0
    largest_batch: int = 0
    records_written: int = 0
    records_journaled: int = 0
    records_replayed: int = 0
    conflicts: int = 0
    rejected: int = 0
    last_error: str | None = None


class PersistenceActor(ServiceActor[_Message]):
    """Batches records into transactions; journals them while the database is away.

    ``journal`` is lent, not owned: it outlives any one incarnation of this actor, so a
    restarted actor continues the same journal (and replays what its predecessor left). The
    node's id is the journal's.
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
        self._connector = Connector(database_url, connect_timeout=config.connect_timeout)
        self._journal = journal
        self._breaker = ConsecutiveFailureBreaker(
            failure_threshold=config.breaker_threshold,
            reset_after=config.breaker_reset,
            max_reset_after=config.breaker_max_reset,
            slow_call=config.slow_commit,
        )
        self._batch: list[_Held] = []
        self._batch_records = 0
        self._activity: dict[str, SessionActivity] = {}
        self._flush_told = False
        self._replay_told = False
        self._journal_broken = False
        self._last_sync = time.monotonic()
        self._last_heartbeat = float("-inf")
        self._stats = _Stats()

    # --- pykka hooks ------------------------------------------------------------------------

    def handle(self, message: _Message) -> PersistenceStatus | None:
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
            case _Replay():
                self._replay_told = False
                self._drain_journal(everything=False)
            case Tick():
                self._tick()
                return self._status()
            case Flush():
                self._explicit_flush(message)
                return self._status()
            case GetStatus():
                return self._status()
            case _:
                assert_never(message)
        return None

    def on_stop(self) -> None:
        self._flush(self._take_activity())
        self._breaker.force_trial()
        self._drain_journal(everything=True)
        self._journal.sync()
        self._connector.close()
        log.info(
            "persistence.stopped",
            journal_pending=self._journal.pending_records,
            records_written=self._stats.records_written,
        )

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # Not expected (every handler contains its errors), but if it happens, what is held
        # must not vanish: journal it, or tell its writers.
        held, self._batch = self._batch, []
        records = [record for h in held for record in h.records]
        failure: BaseException | None = None
        try:
            refused = self._journal.append(records + list(self._take_activity()), durable=True)
        except OSError as exc:
            failure = pykka.ActorDeadError(f"persistence actor crashed: {exc}")
        else:
            if refused:
                first = next(iter(refused.values()))
                log.error("persistence.records_lost", records=len(refused), error=str(first))
        for h in held:
            h.ship.reply(ShipmentResult(errors=h.errors, failure=failure))
        self._connector.close()

    # --- shipments and batches --------------------------------------------------------------

    def _accept(self, ship: Ship) -> None:
        held = _Held(ship)
        for position, record in enumerate(ship.records):
            critical = position in ship.critical
            if critical and isinstance(record, ADMISSIONS) and not self._available():
                held.errors[position] = StorageUnavailable.journal_full(
                    f"{self._journal.size_bytes} bytes"
                )
            elif not critical and isinstance(record, SessionActivity):
                self._coalesce(record)
            else:
                held.records.append(record)
                held.positions.append(position)
        self._batch.append(held)
        self._batch_records += len(held.records)
        if self._batch_records >= self._config.max_batch:
            self._flush()
        elif not self._flush_told:
            self._flush_told = self.tell_self(_FlushSoon())

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

    def _flush(self, extra: Sequence[Record] = ()) -> None:
        """Write the batch (plus ``extra``) and answer its shipments."""
        held, self._batch, self._batch_records = self._batch, [], 0
        records = [record for h in held for record in h.records]
        records.extend(extra)
        durable = any(h.ship.critical for h in held)
        errors: dict[int, Exception] = {}
        lost: StorageUnavailable | None = None
        try:
            errors = self._store(records, durable=durable)
        except StorageUnavailable as exc:
            # Neither the database nor the journal took them. Critical writers are told;
            # background records are lost, loudly (below).
            errors = dict.fromkeys(range(len(records)), exc)
            lost = exc
        except Exception as exc:
            # A bug, not the database: the records cannot be written as they are. Keep them
            # aside rather than retrying forever.
            log.exception("persistence.batch_failed", records=len(records))
            rejected = WriteRejected(f"internal error writing the batch: {exc!r}")
            errors = dict.fromkeys(range(len(records)), rejected)
            self._set_aside([(record, rejected) for record in records])
        if lost is not None:
            count = len(records) - sum(len(h.ship.critical) for h in held)
            log.error("persistence.records_lost", records=count, error=str(lost))
        self._answer(held, errors)

    def _answer(self, held: list[_Held], errors: dict[int, Exception]) -> None:
        available = self._available()
        offset = 0
        unheard: dict[str, int] = {}  # background failures nobody awaits: logged once, here
        for h in held:
            for i, position in enumerate(h.positions):
                error = errors.get(offset + i)
                if error is not None:
                    h.errors[position] = error
                    if position not in h.ship.critical:
                        key = f"{h.records[i].kind}: {error}"[:300]
                        unheard[key] = unheard.get(key, 0) + 1
            offset += len(h.records)
            h.ship.reply(ShipmentResult(errors=h.errors, available=available))
        for key, count in unheard.items():
            log.warning("persistence.background_write_failed", error=key, records=count)

    def _store(self, records: list[Record], *, durable: bool) -> dict[int, Exception]:
        if not records:
            return {}
        if self._database_open():
            started = time.monotonic()
            try:
                result = write_batch(
                    self._connector.connection(),
                    records,
                    statement_timeout=self._config.statement_timeout,
                )
            except psycopg.Error as exc:
                self._database_failed(exc)
            else:
                self._breaker.record(ok=True, duration=time.monotonic() - started)
                self._stats.batches += 1
                self._stats.largest_batch = max(self._stats.largest_batch, len(records))
                self._stats.records_written += len(records) - len(result.rejected)
                self._stats.conflicts += len(result.conflicts)
                self._set_aside([(records[i], error) for i, error in result.rejected.items()])
                return result.errors
        return self._append(records, durable=durable)

    def _database_open(self) -> bool:
        """Should this batch go to the database? Drains the journal first if it may."""
        if self._journal.pending:
            self._drain_journal(everything=False)
            if self._journal.pending:
                return False
            return self._breaker.state is BreakerState.CLOSED
        return self._breaker.allow()

    def _append(self, records: list[Record], *, durable: bool) -> dict[int, Exception]:
        """Journal ``records``; those the bound left out are returned with the reason."""
        try:
            refused = self._journal.append(records, durable=durable)
        except OSError as exc:
            self._journal_broken = True
            raise StorageUnavailable(f"storage unavailable: journal write failed: {exc}") from exc
        self._journal_broken = False
        self._stats.records_journaled += len(records) - len(refused)
        return dict(refused)

    # --- the journal ------------------------------------------------------------------------

    def _drain_journal(self, *, everything: bool) -> None:
        """Replay journal chunks while the breaker allows: one, or ``everything``."""
        while self._journal.pending and self._breaker.allow():
            if not self._replay_chunk() or not everything:
                break
        if (
            self._journal.pending
            and self._breaker.state is BreakerState.CLOSED
            and not self._replay_told
        ):
            self._replay_told = self.tell_self(_Replay())

    def _replay_chunk(self) -> bool:
        records, end = self._journal.read(self._config.replay_chunk)
        started = time.monotonic()
        try:
            result = write_batch(
                self._connector.connection(),
                records,
                replay=True,
                statement_timeout=self._config.statement_timeout,
            )
        except psycopg.Error as exc:
            self._database_failed(exc)
            return False
        except Exception as exc:
            # A bug, not the database. Replaying this chunk again would fail again, and a
            # crash would hand the same journal to the next incarnation: set it aside.
            log.exception("persistence.replay_failed", records=len(records))
            rejected = WriteRejected(f"internal error replaying the journal: {exc!r}")
            self._set_aside([(record, rejected) for record in records])
            self._journal.advance(end, len(records))
            return True
        self._breaker.record(ok=True, duration=time.monotonic() - started)
        self._journal.advance(end, len(records))
        self._stats.records_replayed += len(records)
        self._stats.conflicts += len(result.conflicts)
        for index, conflict in result.conflicts.items():
            log.warning(
                "persistence.replay_conflict", kind=records[index].kind, error=str(conflict)
            )
        self._set_aside([(records[i], error) for i, error in result.rejected.items()])
        if not self._journal.pending:
            log.info("persistence.journal_drained", replayed=self._stats.records_replayed)
        return True

    def _database_failed(self, exc: psycopg.Error) -> None:
        self._connector.discard()
        was = self._breaker.state
        self._breaker.record(ok=False)
        self._stats.last_error = f"{type(exc).__name__}: {exc}".strip()
        log.warning(
            "persistence.database_unavailable",
            error=self._stats.last_error[:300],
            database=database_of(self._breaker.state),
            was=was,
            retry_in=round(self._breaker.retry_in, 3),
        )

    def _set_aside(self, rejected: list[tuple[Record, Exception]]) -> None:
        if not rejected:
            return
        self._stats.rejected += len(rejected)
        try:
            self._journal.set_aside(rejected)
        except OSError:
            log.exception("persistence.set_aside_failed", records=len(rejected))

    # --- periodic and explicit work ---------------------------------------------------------

    def _tick(self) -> None:
        self._journal.sync_if_due()
        now = time.monotonic()
        extra: list[Record] = []
        if now - self._last_sync >= self._config.sync_interval:
            extra += self._take_activity()
        healthy = self._breaker.state is BreakerState.CLOSED and not self._journal.pending
        if healthy and now - self._last_heartbeat >= self._config.heartbeat_interval:
            self._last_heartbeat = now
            extra.append(NodeHeartbeat(node_id=self._journal.node_id))
        if self._journal.pending:
            self._drain_journal(everything=False)
        if extra or self._batch:
            self._flush(extra)

    def _explicit_flush(self, request: Flush) -> None:
        if request.force:
            self._breaker.force_trial()
        extra = self._take_activity()
        if request.retire:
            extra.append(NodeHeartbeat(node_id=self._journal.node_id, stopping=True))
        self._drain_journal(everything=True)
        self._flush(extra)
        self._drain_journal(everything=True)
        self._journal.sync()

    def _available(self) -> bool:
        if self._breaker.state is BreakerState.CLOSED and not self._journal.pending:
            return True
        return not (self._journal.full or self._journal_broken)

    def _status(self) -> PersistenceStatus:
        stats = self._stats
        return PersistenceStatus(
            available=self._available(),
            database=database_of(self._breaker.state),
            queue=self.actor_inbox.qsize() if isinstance(self.actor_inbox, queue.Queue) else 0,
            journal_file=str(self._journal.path),
            journal_bytes=self._journal.size_bytes,
            journal_pending_records=self._journal.pending_records,
            journal_full=self._journal.full,
            batches=stats.batches,
            largest_batch=stats.largest_batch,
            records_written=stats.records_written,
            records_journaled=stats.records_journaled,
            records_replayed=stats.records_replayed,
            conflicts=stats.conflicts,
            rejected=stats.rejected,
            last_error=stats.last_error,
        )
