"""How trio code talks to the persistence actor.

Every record written in one trio scheduling round goes to the actor as one shipment (one pykka
message), sent by a ``run_sync_soon`` callback once the round's tasks have run: no task, no
thread, and no per-record messaging. Measured: ~40k records/s with one pykka ``ask`` per record
against millions with shipments (docs/benchmarks.md). Shipments reach the actor's FIFO inbox in
the order they were sent, so the actor sees records in the order callers wrote them.

Two delivery classes:

* :meth:`PersistenceClient.write` (critical): returns once the record is committed, or, while
  the database is away, appended to the journal and fsynced. It raises ``WriteConflict``
  (versioned task step refused), ``WriteRejected`` (the database refused the record itself),
  ``StorageUnavailable`` (a new session or task while the journal is full, or a record
  the journal's bound leaves out while the database is away), or
  ``ActorUnavailable`` (the actor died first: nothing is known, retrying is safe because
  every write is idempotent). Because the actor is FIFO, a returned ``write`` also means that
  every record this client was given before it has been taken care of.
* :meth:`PersistenceClient.write_soon` (background): never waits, never fails the caller. If
  the actor dies holding it, the record is sent again, with the next shipment, to whatever
  ``resolve`` then returns (the restarted actor).

The actor is reached through ``resolve``, called at each send, so a restarted actor is picked
up without the client noticing: it is a :class:`~runtime.pykka_client.ServiceClient`, like
every pykka service's trio side (:mod:`runtime.pykka_service`), and its pulse is a
:class:`~runtime.pacer.Pacer`. All methods must be called from the trio thread that owns the
client (the first call binds it).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NoReturn

import outcome
import pykka
import structlog
import trio

from actors.persistence.protocol import (
    ADMISSIONS,
    Flush,
    GetStatus,
    Ship,
    ShipmentResult,
    Tick,
)
from runtime import trace
from runtime.bridge import CallbackFuture
from runtime.pacer import Pacer
from runtime.pykka_client import Resolve, ServiceClient
from runtime.status_model import PersistenceStatus
from storage.errors import StorageUnavailable, WriteConflict
from storage.rows import Record, TaskFinished, TaskStarted

log = structlog.get_logger("persistence")

#: How many times a critical versioned step whose row is behind is retried (``write``).
_BEHIND_RETRIES = 4


class _Shipment:
    """Records gathered in one scheduling round; the critical writers among them wait on
    ``done``. ``offset``: how many re-sent records went ahead of them in the message."""

    __slots__ = ("critical", "done", "marks", "offset", "records", "result")

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.marks: list[trace.Postmark] = []
        self.critical: set[int] = set()
        self.done = trio.Event()
        self.offset = 0
        self.result: ShipmentResult | None = None


class PersistenceClient(ServiceClient):
    """The persistence actor's trio face. See the module doc for the delivery classes."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        timeout: float = 30.0,
        max_shipment: int = 1000,
        max_outstanding: int = 200_000,
    ) -> None:
        """``resolve()`` returns the current actor. ``timeout`` bounds a critical write
        (``trio.TooSlowError``; the record may still be written later). ``max_outstanding``
        records sent and not yet answered make the client report storage unavailable, so an
        overloaded database refuses new work instead of growing memory."""
        super().__init__(resolve)
        self._timeout = timeout
        self._max_shipment = max_shipment
        self._max_outstanding = max_outstanding
        self._token: trio.lowlevel.TrioToken | None = None
        self._open: _Shipment | None = None
        self._resend: list[Record] = []
        self._outstanding = 0
        self._actor_available = True

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
        """Can storage take new work? From the actor's latest answer (updated at least every
        pulse) and this client's backlog; cheap, no round trip."""
        return self._actor_available and self._outstanding < self._max_outstanding

    def ensure_available(self) -> None:
        """Raise :class:`StorageUnavailable` if new work (a tool call, a session) should be
        refused: the one check of availability on the trio side, from the actor's latest
        answer and this client's backlog (no round trip)."""
        if not self._actor_available:
            raise StorageUnavailable.journal_full()
        if self._outstanding >= self._max_outstanding:
            reason = f"storage unavailable: {self._outstanding} writes are waiting for the database"
            raise StorageUnavailable(f"{reason}; retry later", reason=reason)

    # --- writing ----------------------------------------------------------------------------

    async def write(self, record: Record) -> None:
        """Critical write: return once committed (or durably journaled); see module doc.

        The one retry layer of a critical write, across a persistence actor restart, until
        ``timeout`` passes (then ``trio.TooSlowError``):

        * a shipment lost with a crashed actor is sent again, with backoff, until the next
          incarnation answers: every record is idempotent, so a record that did land before
          the crash is not duplicated;
        * a versioned step whose row is *behind* (:meth:`WriteConflict.behind`: the earlier
          steps this client re-sends after the restart have not landed, and this one
          overtook them) is retried once those have been flushed, up to
          :data:`_BEHIND_RETRIES` times. A row that moved elsewhere stays a conflict.
        """
        if isinstance(record, ADMISSIONS):
            self.ensure_available()
        backoff = 0.01
        behind = 0
        with trio.fail_after(self._timeout):
            while True:
                shipment, position = self._enqueue(record, critical=True)
                await shipment.done.wait()
                result = shipment.result
                assert result is not None
                if result.failure is not None:
                    # The supervisor is starting the next incarnation; until its death reaches
                    # trio, the resolver may still return the dead one.
                    log.info("persistence.write_retry", error=repr(result.failure), delay=backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                error = result.errors.get(shipment.offset + position)
                if (
                    isinstance(error, WriteConflict)
                    and isinstance(record, TaskStarted | TaskFinished)
                    and error.behind(record.version)
                    and behind < _BEHIND_RETRIES
                ):
                    behind += 1
                    await self.flush()
                    continue
                if error is not None:
                    raise error
                return

    def write_soon(self, record: Record) -> None:
        """Background write: never waits, never lost (see module doc)."""
        self._enqueue(record, critical=False)

    async def flush(self, *, force: bool = False, retire: bool = False) -> PersistenceStatus:
        """Write everything sent so far, including coalesced activity, and try to empty the
        journal; ``force`` tries the database even if the breaker is waiting. ``retire``
        records that this node stops cleanly (call once, at shutdown)."""
        self._ship()
        return await self._ask(Flush(force=force, retire=retire))

    async def status(self) -> PersistenceStatus:
        return await self._ask(GetStatus())

    async def pulse(self, period: float = 1.0) -> NoReturn:
        """Run for the node's lifetime (in its nursery): a pacer that ticks the actor every
        ``period`` seconds, for journal fsyncs, activity sync, heartbeats and database
        retries, and re-sends records a dead actor held. It paces work; it synchronises
        nothing."""
        await Pacer(self._beat, every=period).run()

    async def _beat(self, now: float) -> None:
        if self._resend and self._open is None:
            self._ship()
        # A dead actor's ActorUnavailable is the pacer's to skip: a restarted actor will be
        # there at the next beat.
        await self._ask(Tick())

    # --- shipments --------------------------------------------------------------------------

    def _enqueue(self, record: Record, *, critical: bool) -> tuple[_Shipment, int]:
        shipment = self._open
        if shipment is None:
            shipment = self._open = _Shipment()
            self._trio_token().run_sync_soon(self._ship_soon, idempotent=True)
        position = len(shipment.records)
        shipment.records.append(record)
        shipment.marks.append(trace.postmark())  # the writer's trace, for its timeline
        if critical:
            shipment.critical.add(position)
        if position + 1 >= self._max_shipment:
            self._ship()
        return shipment, position

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
            shipment = _Shipment()
        resend, self._resend = self._resend, []
        shipment.offset = len(resend)
        records = (*resend, *shipment.records)
        self._outstanding += len(records)
        token = self._trio_token()
        message = Ship(
            records=records,
            critical=frozenset(position + len(resend) for position in shipment.critical),
            reply=partial(self._on_reply, token, shipment, records),
            marks=tuple(shipment.marks),
        )
        try:
            future = self._resolve().ask(message, block=False)
        except Exception as exc:  # the resolver itself failed: no actor to send to
            self._on_reply(token, shipment, records, ShipmentResult(failure=exc))
            return
        if isinstance(future, CallbackFuture):
            future.add_done_callback(partial(self._on_asked, token, shipment, records))

    def _on_asked(
        self,
        token: trio.lowlevel.TrioToken,
        shipment: _Shipment,
        records: tuple[Record, ...],
        result: outcome.Outcome[object],
    ) -> None:
        # pykka's own reply: success only means "received"; the real answer comes through
        # ``Ship.reply``. An error means the actor died with the shipment still in its inbox.
        if isinstance(result, outcome.Error):
            self._on_reply(token, shipment, records, ShipmentResult(failure=result.error))

    def _on_reply(
        self,
        token: trio.lowlevel.TrioToken,
        shipment: _Shipment,
        records: tuple[Record, ...],
        result: ShipmentResult,
    ) -> None:
        # Any thread: hand over to the trio thread.
        try:
            token.run_sync_soon(self._deliver, shipment, records, result)
        except trio.RunFinishedError:
            finished = True
        else:
            finished = False
        if finished and result.failure is not None:
            log.error("persistence.records_lost", records=len(records), reason="trio run ended")

    def _deliver(
        self, shipment: _Shipment, records: tuple[Record, ...], result: ShipmentResult
    ) -> None:
        if shipment.result is not None:
            return  # answered already (the actor replied, then its death was noticed)
        shipment.result = result
        self._outstanding -= len(records)
        if result.failure is None:
            self._actor_available = result.available
        else:
            waiting = {position + shipment.offset for position in shipment.critical}
            again = [record for i, record in enumerate(records) if i not in waiting]
            self._resend.extend(again)
            log.warning(
                "persistence.shipment_failed",
                resend=len(again),
                critical=len(waiting),
                error=repr(result.failure),
            )
        shipment.done.set()

    async def _ask(self, message: Flush | Tick | GetStatus) -> PersistenceStatus:
        with trio.fail_after(self._timeout if isinstance(message, GetStatus) else math.inf):
            status = await self.ask(message)
        assert isinstance(status, PersistenceStatus)
        self._actor_available = status.available
        return status

    def _trio_token(self) -> trio.lowlevel.TrioToken:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        return self._token
