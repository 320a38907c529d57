"""How trio code talks to the persistence actor.

Every record written in one trio scheduling round goes to the actor as one shipment (one pykka
message), sent by a ``run_sync_soon`` callback once the round's tasks have run: no task, no
thread, and no per-record messaging. Measured: ~40k records/s with one pykka ``ask`` per record
against millions with shipments (docs/benchmarks.md). Shipments reach the actor's FIFO inbox in
the order they were sent, so the journal, and after it the database, see records in the order
callers wrote them.

Delivery classes (what each waits for is a :class:`~actors.persistence.protocol.Point`):

* :meth:`PersistenceClient.write`: returns once the record is as durable as the node's
  durability setting says (:mod:`storage.durability`): ``commit``, in the database (or, while
  the database is down, fsynced in the journal); ``journal``, fsynced in the journal
  (``fsync=False``: written to it, which survives the process but not the machine);
  ``async``, written to the journal. Raises ``WriteConflict`` (a versioned task step refused,
  when the database was waited for), ``WriteRejected`` (the database refused the record),
  ``StorageUnavailable`` (a new session or task while the journal is full, a record the
  journal's bound leaves out, a journal that cannot be written), ``trio.TooSlowError`` after
  ``timeout`` (the record may still land). Because the actor is FIFO, a returned ``write``
  covers every record this client was given before it, to the same point.
* :meth:`PersistenceClient.write_through`: returns once the record is in the *database*,
  whatever the durability setting: for the few records another node must see at once.
  Refused at once with ``StorageUnavailable`` while the database is known to be down.
* :meth:`PersistenceClient.write_committed`: in the database, or while it is down fsynced in
  the journal, whatever the durability setting: for records this node reads back from the
  database at once (read your own writes).
* :meth:`PersistenceClient.write_soon` (background): never waits, never fails the caller. If
  the actor dies before taking it, the record is sent again, with the next shipment, to
  whatever ``resolve`` then returns (the restarted actor).

Answers come from :class:`~actors.persistence.protocol.Progress` reports, which the actor and
its database writer send after every append, commit and failure: a waiter is answered once the
journal position after its record is synced or committed, as it asked. A report comes from
another thread and is handed to the trio thread with ``run_sync_soon``.

The actor is reached through ``resolve``, called at each send, so a restarted actor is picked
up without the client noticing: it is a :class:`~runtime.pykka_client.ServiceClient`, like
every pykka service's trio side (:mod:`runtime.pykka_service`), and its pulse is a
:class:`~runtime.pacer.Pacer`, with the shipper and the timekeeper (which keeps the waiting
writes' deadlines, :meth:`PersistenceClient._timekeeper`) beside it. All methods must be called
from the trio thread that owns the client (the first call binds it).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn

import outcome
import pykka
import structlog
import trio
from pydantic import JsonValue

from actors.persistence.protocol import (
    ADMISSIONS,
    Flush,
    GetStatus,
    Point,
    Progress,
    Ship,
    Tick,
)
from runtime import trace
from runtime.bridge import CallbackFuture
from runtime.pacer import Pacer
from runtime.pykka_client import Resolve, ServiceClient
from runtime.status_model import PersistenceStatus
from storage.durability import Durability
from storage.errors import StorageUnavailable
from storage.rows import Record

log = structlog.get_logger("persistence")

#: The points only the database's commits reach.
_DATABASE_POINTS = frozenset({Point.COMMITTED, Point.DATABASE})

#: Answered writes kept behind a waiting one before :meth:`PersistenceClient._trim_deadlines`
#: looks through them all.
_TRIM_AT_LEAST = 1024

#: What :meth:`PersistenceClient.write` waits for, per durability setting.
_WRITE_POINT = {
    Durability.COMMIT: Point.COMMITTED,
    Durability.JOURNAL: Point.SYNCED,
    Durability.ASYNC: Point.WRITTEN,
}


class _Waiter:
    """One awaited record: answered (``done``) with ``error`` or success; ``deadline``
    (``trio.current_time()``), when the timekeeper answers it with ``trio.TooSlowError``."""

    __slots__ = ("deadline", "done", "end", "error", "key", "point")

    def __init__(self, point: Point, deadline: float = math.inf) -> None:
        self.point = point
        self.deadline = deadline
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.end = 0
        #: (shipment, position), once placed: where the database writer's errors find it.
        self.key: tuple[int, int] | None = None

    def settle(self, error: BaseException | None = None) -> None:
        # A waiter handed back by a stopping timekeeper (_UNKEPT) is still unanswered: an
        # answer that comes before its caller waits again is its answer.
        if not self.done.is_set() or self.error is _UNKEPT:
            self.error = error
            self.done.set()


class _Shipment:
    """Records gathered in one scheduling round, and the waiters among them."""

    __slots__ = ("ident", "marks", "records", "sent_at", "waiters")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.records: list[Record] = []
        self.marks: list[trace.Postmark] = []
        self.waiters: dict[int, _Waiter] = {}
        self.sent_at = 0.0


class _ActorLost(Exception):
    """The actor died before it took a shipment: nothing of it was kept; send it again."""


class _Unkept(Exception):
    """Never raised: what a stopping timekeeper wakes the writes it kept with, so that each
    waits on in a cancel scope of its own, to its deadline (:meth:`PersistenceClient._attempt`)."""


_UNKEPT = _Unkept()


class PersistenceClient(ServiceClient):
    """The persistence actor's trio face. See the module doc for the delivery classes."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        durability: Durability = Durability.COMMIT,
        timeout: float = 30.0,
        max_shipment: int = 1000,
        max_outstanding: int = 200_000,
    ) -> None:
        """``resolve()`` returns the current actor. ``durability`` is what :meth:`write`
        waits for (the node passes its setting; ``commit`` here, the strictest). ``timeout``
        bounds a waiting write (``trio.TooSlowError``; the record may still be written
        later). ``max_outstanding`` records sent and not yet appended make the client report
        storage unavailable, so an overloaded node refuses new work instead of growing
        memory."""
        super().__init__(resolve)
        self.durability = durability
        self._timeout = timeout
        self._max_shipment = max_shipment
        self._max_outstanding = max_outstanding
        self._token: trio.lowlevel.TrioToken | None = None
        self._open: _Shipment | None = None
        self._sent: dict[int, _Shipment] = {}
        self._next_id = 0
        self._resend: list[Record] = []
        self._outstanding = 0
        self._actor_available = True
        self._database_down = False
        self._synced = 0
        self._committed = 0
        self._waiting: dict[Point, deque[_Waiter]] = {point: deque() for point in Point}
        #: Awaited writes' first attempts, in deadline order, while the timekeeper runs
        #: (:meth:`_timekeeper`); answered ones leave from the front (:meth:`_trim_deadlines`).
        self._deadlines: deque[_Waiter] = deque()
        self._keeping_time = False
        self._trim_at = _TRIM_AT_LEAST
        self._placed: dict[tuple[int, int], _Waiter] = {}
        self._confirming: deque[tuple[int, float]] = deque()
        self._confirmed_at: float | None = None
        self._listening: Callable[[Progress], None] | None = None
        self._snapshot: Callable[[], dict[str, JsonValue]] | None = None
        #: The shipper runs (:meth:`_shipper`), and the event that wakes it.
        self._shipping = False
        self._ship_wanted = trio.Event()
        #: Writes waiting for the database (``COMMITTED``, ``DATABASE``), counted on the trio
        #: thread before their record is shipped; read by the reporting threads.
        self._database_waits = 0
        #: The flags of the last report handed to the trio thread, and the lock that keeps
        #: the reporting threads' hand-overs in one order.
        self._forwarded_flags = (False, True)
        self._forwarding = threading.Lock()

    @classmethod
    def for_ref(cls, ref: pykka.ActorRef[Any], **kwargs: Any) -> PersistenceClient:
        """A client for one fixed actor (no restarts)."""
        return cls(lambda: ref, **kwargs)

    def crash_actor_for_test(self) -> None:
        """Test-only fault (``EXAI_TEST_FAULTS``): :meth:`crash_for_test`."""
        self.crash_for_test()

    # --- availability -----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Can storage take new work? From the actor's latest report (at least every pulse)
        and this client's backlog; cheap, no round trip."""
        return self._actor_available and self._outstanding < self._max_outstanding

    def ensure_available(self) -> None:
        """Raise :class:`StorageUnavailable` if new work (a tool call, a session) should be
        refused: the one check of availability on the trio side, from the actor's latest
        report and this client's backlog (no round trip)."""
        if not self._actor_available:
            raise StorageUnavailable.journal_full()
        if self._outstanding >= self._max_outstanding:
            reason = f"storage unavailable: {self._outstanding} writes are waiting for the journal"
            raise StorageUnavailable(f"{reason}; retry later", reason=reason)

    # --- writing ----------------------------------------------------------------------------

    async def write(self, record: Record, *, fsync: bool = True) -> None:
        """Return once ``record`` is as durable as the node's setting says (module doc).
        ``fsync=False``, with ``journal`` durability: once it is written to the journal
        (survives the process, not the machine), for records whose loss with the machine
        harms no one (a read-only call's intent)."""
        point = _WRITE_POINT[self.durability]
        if point is Point.SYNCED and not fsync:
            point = Point.WRITTEN
        await self._write(record, point)

    async def write_through(self, record: Record) -> None:
        """Return once ``record`` is in the database, whatever the durability setting.

        Raises :class:`StorageUnavailable` at once, writing nothing, while the database is
        known to be down; ``trio.TooSlowError`` after ``timeout`` (the record is in the
        journal and lands when the database is back); and what :meth:`write` raises."""
        if self._database_down:
            reason = "storage unavailable: the database is unreachable"
            raise StorageUnavailable(f"{reason}; nothing was written, retry later", reason=reason)
        await self._write(record, Point.DATABASE)

    async def write_committed(self, record: Record) -> None:
        """Return once ``record`` is in the database, or, while the database is down, fsynced
        in the journal (it lands when the database is back), whatever the durability setting:
        for records this node reads back from the database at once (a conversation's turns,
        which its next turn reads). Raises what :meth:`write` raises."""
        await self._write(record, Point.COMMITTED)

    async def _write(self, record: Record, point: Point) -> None:
        """Send ``record`` and wait for ``point``; ``trio.TooSlowError`` ``timeout`` seconds
        after the call, wherever it waits. While the pulse runs, the first attempt has no
        cancel scope of its own: the timekeeper answers its waiter with the error at its
        deadline (a cancel scope and a deadline per write were ~2 % of the event loop at 50
        sessions; issue 17). Retries after a lost actor (rare) run in one."""
        if isinstance(record, ADMISSIONS):
            self.ensure_available()
        deadline = trio.current_time() + self._timeout
        error: BaseException | None = None
        if self._keeping_time:
            error = await self._attempt(record, point, deadline)
            if not isinstance(error, _ActorLost):
                if error is not None:
                    raise error
                return
        backoff = 0.01
        with trio.fail_at(deadline):
            while True:
                if isinstance(error, _ActorLost):
                    # The supervisor is starting the next incarnation; until its death reaches
                    # trio, the resolver may still return the dead one.
                    log.info("persistence.write_retry", error=repr(error), delay=backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                error = await self._attempt(record, point)
                if not isinstance(error, _ActorLost):
                    break
        if error is not None:
            raise error

    async def _attempt(
        self, record: Record, point: Point, deadline: float | None = None
    ) -> BaseException | None:
        """Send ``record`` once and wait for its answer: the error it was answered with, or
        ``None``. ``deadline``: the timekeeper's to keep (the caller has no cancel scope)."""
        waiter = _Waiter(point, math.inf if deadline is None else deadline)
        if deadline is not None:
            self._deadlines.append(waiter)
        waits_for_database = point in _DATABASE_POINTS
        if waits_for_database:
            self._database_waits += 1
        try:
            self._enqueue(record, waiter)
            await waiter.done.wait()
            if waiter.error is _UNKEPT:
                # The timekeeper stopped (the pulse ended) before this was answered: no one
                # keeps its deadline now but this scope.
                waiter.error = None
                waiter.done = trio.Event()
                with trio.fail_at(waiter.deadline):
                    await waiter.done.wait()
        finally:
            if waits_for_database:
                self._database_waits -= 1
            if deadline is not None:
                self._trim_deadlines()
        return waiter.error

    def write_soon(self, record: Record) -> None:
        """Background write: never waits, never lost (see module doc)."""
        self._enqueue(record, None)

    async def flush(self, *, force: bool = False, retire: bool = False) -> PersistenceStatus:
        """Append everything sent so far, including coalesced activity, fsync it, and wait
        until the database has it all (or has failed); ``force`` tries the database even if
        the breaker is waiting. ``retire`` records that this node stops cleanly (call once,
        at shutdown)."""
        self._ship()
        return await self._ask(Flush(reply=CallbackFuture(), force=force, retire=retire))

    async def status(self) -> PersistenceStatus:
        return await self._ask(GetStatus())

    async def pulse(
        self,
        period: float = 1.0,
        *,
        snapshot: Callable[[], dict[str, JsonValue]] | None = None,
    ) -> NoReturn:
        """Run for the node's lifetime (in its nursery): a pacer that ticks the actor every
        ``period`` seconds, for journal fsyncs, activity sync, heartbeats and reports, and
        re-sends records a dead actor never took; and the shipper (see :meth:`_shipper`).
        It paces work; it synchronises nothing. Cancel it to stop both: a shipment opened
        and not yet sent is sent on the way out. ``snapshot()``, called on the trio thread at
        each beat, is what the node publishes with its heartbeat (cheap counts only)."""
        self._snapshot = snapshot
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._shipper)
            nursery.start_soon(self._timekeeper)
            await Pacer(self._beat, every=period).run()

    async def _shipper(self) -> None:
        """Send each shipment once the scheduling round that opened it has run.

        Woken by a :class:`trio.Event`, it runs in the next batch of the run loop, after the
        tasks of the round that wrote the records: the same batching as a ``run_sync_soon``
        callback, without the wake-up socket's write, read and extra loop iteration that a
        ``run_sync_soon`` costs even from the trio thread (a few per call at low load;
        issue 17). While it does not run (before the pulse starts, after it stops), shipments
        go through ``run_sync_soon`` as before."""
        self._ship_wanted = trio.Event()
        self._shipping = True
        try:
            while True:
                await self._ship_wanted.wait()
                self._ship_wanted = trio.Event()
                self._ship_soon()
        finally:
            self._shipping = False
            # Cancelled with a shipment open: it must not wait for a wake-up that will not
            # come (the pulse's owner flushes after it, but a write may be waiting now).
            if self._open is not None:
                self._ship_soon()

    async def _timekeeper(self) -> None:
        """Answer each awaited write still waiting at its deadline with ``trio.TooSlowError``,
        at that deadline (trio's clock, as ``fail_at``'s). Writes wait in :attr:`_deadlines`
        in deadline order, since each is ``timeout`` after its call: the earliest is first,
        and a write sent after this sleep began expires after it ends. While it does not run
        (before the pulse starts, after it stops), writes keep their deadlines in a cancel
        scope each; those sent while it ran, and still waiting when it stops, are woken as it
        stops and wait on in one each, to the same deadline (no write waits with none: a
        shielded write of a session ending after a pulse that failed still times out).

        Late by a scheduling round or two at most: the waiter's task is woken by an event
        this task sets, where a cancel scope's deadline would reach it in the round the
        deadline passed; a loop busy for longer delays both alike."""
        self._keeping_time = True
        try:
            while True:
                now = trio.current_time()
                deadlines = self._deadlines
                while deadlines and (deadlines[0].done.is_set() or deadlines[0].deadline <= now):
                    deadlines.popleft().settle(trio.TooSlowError())  # no-op if answered
                await trio.sleep_until(deadlines[0].deadline if deadlines else now + self._timeout)
        finally:
            self._keeping_time = False
            deadlines, self._deadlines = self._deadlines, deque()
            self._trim_at = _TRIM_AT_LEAST
            for waiter in deadlines:
                waiter.settle(_UNKEPT)  # no-op if answered

    def _trim_deadlines(self) -> None:
        """Forget answered writes at the front of :attr:`_deadlines`; and, should a write that
        waits long hold many answered ones behind it, those too, once there are more than
        twice as many as were left waiting last time (or 1,024; again once none waits):
        amortised, each write is looked at a bounded number of times, and memory stays
        bounded by the writes waiting."""
        deadlines = self._deadlines
        while deadlines and deadlines[0].done.is_set():
            deadlines.popleft()
        if not deadlines:
            self._trim_at = _TRIM_AT_LEAST
        elif len(deadlines) > self._trim_at:
            self._deadlines = deque(w for w in deadlines if not w.done.is_set())
            self._trim_at = max(_TRIM_AT_LEAST, 2 * len(self._deadlines))

    async def _beat(self, now: float) -> None:
        if self._resend and self._open is None:
            self._ship()
        # A dead actor's ActorUnavailable is the pacer's to skip: a restarted actor will be
        # there at the next beat.
        await self._ask(Tick(snapshot=self._snapshot() if self._snapshot is not None else None))

    # --- shipments --------------------------------------------------------------------------

    def _enqueue(self, record: Record, waiter: _Waiter | None) -> None:
        shipment = self._open
        if shipment is None:
            shipment = self._open = self._new_shipment()
            if self._shipping:
                self._ship_wanted.set()
            else:
                self._trio_token().run_sync_soon(self._ship_soon, idempotent=True)
        position = len(shipment.records)
        shipment.records.append(record)
        shipment.marks.append(trace.postmark())  # the writer's trace, for its timeline
        if waiter is not None:
            shipment.waiters[position] = waiter
        if position + 1 >= self._max_shipment:
            self._ship()

    def _new_shipment(self) -> _Shipment:
        self._next_id += 1
        return _Shipment(self._next_id)

    def _ship_soon(self) -> None:
        # Runs as a trio run_sync_soon callback, where an exception would crash the whole
        # run: contain it (only a bug could raise here).
        try:
            self._ship()
        except Exception:
            log.exception("persistence.ship_failed")

    def _ship(self) -> None:
        """Send the open shipment (and any records to re-send ahead of it)."""
        shipment, self._open = self._open, None
        if shipment is None:
            if not self._resend:
                return
            shipment = self._new_shipment()
        if self._resend:
            # Records a dead actor never took go first, keeping their order; the waiters'
            # positions move behind them.
            resend, self._resend = self._resend, []
            shipment.records[:0] = resend
            shipment.waiters = {p + len(resend): w for p, w in shipment.waiters.items()}
        shipment.sent_at = time.time()
        self._outstanding += len(shipment.records)
        self._sent[shipment.ident] = shipment
        token = self._trio_token()
        message = Ship(
            shipment_id=shipment.ident,
            records=tuple(shipment.records),
            waits={position: waiter.point for position, waiter in shipment.waiters.items()},
            listener=self._listener(token),
            marks=tuple(shipment.marks),
        )
        try:
            future = self.ref().ask(message, block=False)
        except Exception as exc:  # no actor to send to
            self._lost(shipment, exc)
            return
        if isinstance(future, CallbackFuture):
            future.add_done_callback(partial(self._on_asked, token, shipment.ident))

    def _on_asked(
        self, token: trio.lowlevel.TrioToken, ident: int, result: outcome.Outcome[object]
    ) -> None:
        # pykka's own reply: success only means "received"; what became of the records comes
        # through the listener. An error means the actor died with the shipment in its inbox.
        if isinstance(result, outcome.Error):
            with _finished_run(ident):
                token.run_sync_soon(self._actor_lost, ident, result.error)

    def _actor_lost(self, ident: int, error: BaseException) -> None:
        shipment = self._sent.get(ident)
        if shipment is not None:
            self._lost(shipment, error)

    def _lost(self, shipment: _Shipment, error: BaseException) -> None:
        self._sent.pop(shipment.ident, None)
        self._outstanding -= len(shipment.records)
        again = [r for i, r in enumerate(shipment.records) if i not in shipment.waiters]
        self._resend.extend(again)
        log.warning(
            "persistence.shipment_failed",
            resend=len(again),
            critical=len(shipment.waiters),
            error=repr(error),
        )
        lost = _ActorLost(repr(error))
        for waiter in shipment.waiters.values():
            waiter.settle(lost)

    # --- progress ---------------------------------------------------------------------------

    def _on_progress(self, token: trio.lowlevel.TrioToken, progress: Progress) -> None:
        # Any thread: hand over to the trio thread, unless the report tells it nothing it
        # needs: no shipment placed, no error, the same flags, and no write waiting for the
        # database (whose commits are all it would say). The database writer reports every
        # commit, and each hand-over wakes the event loop (a socket write and a read, and a
        # GIL switch): with ``journal`` durability nobody waits for those (issue 17). A write
        # counts itself before its record is shipped, so a commit that covers it sees it.
        # What is skipped is caught up by the next report or status (the pulse asks for one
        # every second), so ``committed`` and ``confirmed_at`` may lag by that much.
        flags = (progress.database_down, progress.available)
        with self._forwarding:
            if (
                not progress.placed
                and not progress.errors
                and not self._database_waits
                and flags == self._forwarded_flags
            ):
                return
            self._forwarded_flags = flags
            with _finished_run(progress.placed):
                token.run_sync_soon(self._progress, progress)

    def _progress(self, progress: Progress) -> None:
        """Apply a report: errors first (they may concern records the same report places or
        commits), then placements, then every waiter the positions now answer."""
        self._actor_available = progress.available
        self._database_down = progress.database_down
        for key, error in progress.errors.items():
            errored = self._sent.get(key[0])
            waiter = errored.waiters.get(key[1]) if errored is not None else None
            if waiter is None:
                waiter = self._placed.pop(key, None)
            if waiter is not None:
                waiter.settle(error)
        for ident, end in progress.placed.items():
            shipment = self._sent.pop(ident, None)
            if shipment is None:
                continue
            self._outstanding -= len(shipment.records)
            self._confirming.append((end, shipment.sent_at))
            for position, waiter in shipment.waiters.items():
                waiter.end = end
                if waiter.point is Point.WRITTEN:
                    waiter.settle()
                elif not waiter.done.is_set():
                    waiter.key = (ident, position)
                    self._placed[waiter.key] = waiter
                    self._waiting[waiter.point].append(waiter)
        self._advance(progress.synced, progress.committed)

    def _advance(self, synced: int, committed: int) -> None:
        self._synced = max(self._synced, synced)
        self._committed = max(self._committed, committed)
        synced, committed = self._synced, self._committed
        placed = self._placed
        _settle_through(self._waiting[Point.SYNCED], synced, placed)
        _settle_through(self._waiting[Point.DATABASE], committed, placed)
        # A commit waits for the database, or, while it is down, for the fsync.
        fallback = max(committed, synced) if self._database_down else committed
        _settle_through(self._waiting[Point.COMMITTED], fallback, placed)
        durable = max(synced, committed)
        confirming = self._confirming
        while confirming and confirming[0][0] <= durable:
            self._confirmed_at = confirming.popleft()[1]

    async def _ask(self, message: Flush | Tick | GetStatus) -> PersistenceStatus:
        with trio.fail_after(self._timeout if isinstance(message, GetStatus) else math.inf):
            status = await self.ask(message)
        assert isinstance(status, PersistenceStatus)
        self._actor_available = status.available
        self._database_down = status.database != "up"
        self._advance(status.synced, status.committed)
        confirmed = self._confirmed_at
        at = datetime.fromtimestamp(confirmed, UTC) if confirmed is not None else None
        return status.model_copy(update={"confirmed_at": at, "durability": str(self.durability)})

    def _listener(self, token: trio.lowlevel.TrioToken) -> Callable[[Progress], None]:
        """This client's listener: one object for its life, so that the actor knows each
        client once however many shipments it sends."""
        if self._listening is None:
            self._listening = partial(self._on_progress, token)
        return self._listening

    def _trio_token(self) -> trio.lowlevel.TrioToken:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        return self._token


def _settle_through(
    waiters: deque[_Waiter], position: int, placed: dict[tuple[int, int], _Waiter]
) -> None:
    """Answer the waiters (in position order) whose records end at or before ``position``."""
    while waiters and waiters[0].end <= position:
        waiter = waiters.popleft()
        if waiter.key is not None:
            placed.pop(waiter.key, None)
        waiter.settle()


class _finished_run:
    """Swallow ``trio.RunFinishedError`` (a report arriving after the node's trio run ended:
    nobody is left to answer), logging it once."""

    def __init__(self, what: object) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: object, traceback: object) -> bool:
        if isinstance(error, trio.RunFinishedError):
            log.debug("persistence.report_after_run", what=repr(self._what)[:100])
            return True
        return False
