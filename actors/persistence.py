"""The persistence actor: the only code that writes to Postgres.

A pykka thread owns the connection pool because psycopg's async API does not run under trio
(BRIEF.md); one owner also serialises writes, so their order is the order sessions sent them.
Session actors never touch the database: they ``ask`` this actor with a typed message and await
the commit through :mod:`runtime.bridge`.

Stopping (``stop()``) is queued behind every write already sent, so a graceful shutdown
flushes everything accepted before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TypeAlias

import outcome
import pykka
import structlog
import trio
from psycopg_pool import ConnectionPool

from runtime.bridge import BridgedActor, CallbackFuture, wait_reply
from storage.queries import close_session, identify_session, insert_session
from storage.rows import SessionClose, SessionIdentified, SessionRow

log = structlog.get_logger("persistence")

Record: TypeAlias = SessionRow | SessionIdentified | SessionClose


@dataclass(frozen=True, slots=True)
class Write:
    """One write, committed before the reply. The union below is everything the actor accepts."""

    record: Record


class PersistenceActor(BridgedActor):
    """Each ``Write`` is committed in its own transaction before it is answered.

    The pool is lent, not owned: it outlives any one incarnation of this actor, so replacing a
    crashed actor does not reconnect to the database.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__()
        self._pool = pool

    def on_stop(self) -> None:
        log.info("persistence.stopped")

    def on_receive(self, message: object) -> None:
        if not isinstance(message, Write):
            raise TypeError(f"persistence actor got {type(message).__name__}, expected Write")
        record = message.record
        with self._pool.connection() as conn:
            if isinstance(record, SessionRow):
                insert_session(conn, record)
            elif isinstance(record, SessionIdentified):
                identify_session(conn, record)
            else:
                close_session(conn, record)


class PersistenceClient:
    """How trio code talks to the persistence actor.

    ``write`` is for critical records: it returns once the row is committed. ``write_soon`` is
    for background records: the caller does not wait; a failure is logged here, once.
    """

    def __init__(self, ref: pykka.ActorRef[PersistenceActor], *, timeout: float = 30.0) -> None:
        self._ref = ref
        self._timeout = timeout

    async def write(self, record: Record) -> None:
        with trio.fail_after(self._timeout):
            await wait_reply(self._ref.ask(Write(record), block=False))

    def write_soon(self, record: Record) -> None:
        # `ask`, not `tell`: an exception while handling a pykka `tell` stops the actor.
        future = self._ref.ask(Write(record), block=False)
        assert isinstance(future, CallbackFuture)
        future.add_done_callback(partial(_log_failure, record))


def _log_failure(record: Record, result: outcome.Outcome[None]) -> None:
    if isinstance(result, outcome.Error):
        log.error(
            "persistence.write_failed",
            record=type(record).__name__,
            error=repr(result.error),
        )
