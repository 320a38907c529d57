"""A session run over any transport: its reader, and its actor under a restart loop.

The transport (``lifecycle`` for WebSocket, ``memory`` in memory, Streamable HTTP next)
gives a :class:`~runtime.connection.Connection` and a :data:`~runtime.connection.Receive`,
runs its own tasks (a writer, a watchdog) beside :func:`run_session`, and decides what a
dropped connection means (parking for resume is WebSocket's). Nothing here knows the
transport, so a new one needs no change here.

Tasks (all in :func:`run_session`'s nursery, which owns them): the reader
(:func:`~actors.session.reader.pump`) and the session actor under a one-child supervisor with
OTP ``transient`` semantics: a crash is restarted over the same :class:`SessionState` and
mailbox, unless more than ``max_restarts`` crashes fall within ``restart_period`` seconds,
in which case the session gives up (:class:`~runtime.supervision.SupervisorGaveUp`, raised
to the transport, which closes its connection: 1011 on WebSocket). The reader's end is the
session's: its actor and running tool calls are cancelled, since nobody could receive their
answers, and the mailbox is closed (what is left in it becomes dead letters).

A session's rows: :func:`open_session` before it first runs (the ``sessions`` row, awaited:
a session the database does not know is refused), :func:`end_session` once it is over for
good (closed with its totals, logged as ``session.closed``), whatever the transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import structlog
import trio

from actors.session.actor import Message, SessionActor
from actors.session.config import SessionServices
from actors.session.reader import ReaderLimits, pump
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime import trace
from runtime.actor import close_mailbox, run_actor
from runtime.budget import ByteBudget
from runtime.connection import Connection, ConnectionGone, Receive
from runtime.mailbox import ActorRef, Inbox, open_mailbox
from runtime.supervision.errors import SupervisorGaveUp
from runtime.supervision.intensity import RestartIntensity
from storage.rows import SessionClose, SessionRow

__all__ = ["Attach", "end_session", "open_session", "record_end", "run_session"]

log = structlog.get_logger("session")

#: How a transport registers a running session for status: given its mailbox, the entry
#: (``actors.status.LiveSession``) whose meter and restart count the session keeps.
Attach = Callable[[ActorRef[Message]], LiveSession]


async def open_session(
    services: SessionServices, *, session_id: str, remote: str, identity: str
) -> SessionState:
    """A new session, once its row is written (awaited); logged as ``session.opened``.

    Raises :class:`~actors.persistence.StorageUnavailable` if storage refused it (the
    transport refuses the client: 1013 on WebSocket).
    """
    await services.persistence.write(
        SessionRow(
            session_id=session_id,
            created_at=datetime.now(UTC),
            remote_addr=remote,
            node_id=services.config.node_id,
        )
    )
    log.info("session.opened", session_id=session_id, remote=remote, identity=identity)
    return SessionState(session_id=session_id, remote=remote, identity=identity)


async def run_session(
    services: SessionServices,
    state: SessionState,
    connection: Connection,
    receive: Receive,
    *,
    attach: Attach,
) -> None:
    """Run the session over ``connection`` until its reader ends (see the module doc).

    Returns when the peer has gone plainly (``ConnectionGone``), the session closed the
    connection itself (a frame it refuses), or the connection stopped being writable for
    good. Raises what ``receive`` raises when the peer goes, and
    :class:`~runtime.supervision.SupervisorGaveUp`, each inside an exception group.
    """
    path = f"/root/sessions/{state.session_id}"
    bounds = services.bounds
    ref: ActorRef[Message]
    inbox: Inbox[Message]
    ref, inbox = open_mailbox(
        path,
        services.mailbox_capacity,
        budget=ByteBudget(bounds.mailbox_bytes, bounds.node_mailbox),
    )
    try:
        live = attach(ref)
        postmarks = trace.Postmarks()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    _supervise_actor,
                    services,
                    state,
                    connection,
                    inbox,
                    live=live,
                    postmarks=postmarks,
                )
            )
            await pump(
                receive,
                ref,
                connection=connection,
                state=state,
                limits=ReaderLimits(services.max_message_bytes, bounds.max_batch),
                postmarks=postmarks,
                meter=live.meter,
            )
            nursery.cancel_scope.cancel()
    except* ConnectionGone:
        # A call that found the connection gone while the session was being cancelled (a
        # tool sending progress, say): the connection going away is the end, not a crash.
        pass
    finally:
        close_mailbox(path, inbox)


async def end_session(
    services: SessionServices, state: SessionState, code: int | None, reason: str
) -> None:
    """The session is over for good: record its end, with its totals as they are now, tell
    ``session_ended`` (the rate limiter), and log ``session.closed`` with how its (last)
    connection closed: ``code`` (RFC 6455 section 7.4, ``None`` if no close was seen),
    ``reason``, and how long the session lived (``duration_s``, from its first connection,
    across resumes). It leaves the registry first. Shielded, and bounded to 10 seconds."""
    entry = services.registry.end(state.session_id)
    await record_end(
        services, state, code, reason, opened_at=entry.opened_at if entry is not None else None
    )


async def record_end(
    services: SessionServices,
    state: SessionState,
    code: int | None,
    reason: str,
    *,
    opened_at: float | None,
) -> None:
    """:func:`end_session` for a session that has already left the registry (the reaper's
    expiry): ``opened_at`` is its entry's (``time.monotonic()``), for ``duration_s``."""
    closed = datetime.now(UTC)
    with trio.move_on_after(10) as scope:
        scope.shield = True
        await services.persistence.write(
            SessionClose(
                session_id=state.session_id,
                closed_at=closed,
                last_activity=closed,
                tool_calls=state.tool_calls,
                tool_errors=state.tool_errors,
            )
        )
        if services.session_ended is not None:
            await services.session_ended(state.session_id)
    log.info(
        "session.closed",
        session_id=state.session_id,
        code=code,
        reason=reason,
        duration_s=round(time.monotonic() - opened_at, 3) if opened_at is not None else None,
    )


async def _supervise_actor(
    services: SessionServices,
    state: SessionState,
    connection: Connection,
    inbox: Inbox[Message],
    *,
    live: LiveSession,
    postmarks: trace.Postmarks,
) -> None:
    """The session actor's restart loop (OTP ``transient``: a normal end is not restarted)."""
    intensity = RestartIntensity(services.max_restarts, services.restart_period)
    path = f"/root/sessions/{state.session_id}"
    while True:
        actor = SessionActor(
            state,
            connection,
            services.tools,
            services.persistence,
            services.config,
            mailbox=live.mailbox,
            postmarks=postmarks,
            meter=live.meter,
        )
        try:
            await run_actor(actor, inbox)
        except ConnectionGone:
            return  # the connection is going away: not a crash, the end
        except Exception as error:
            if not intensity.allow(trio.current_time()):
                raise SupervisorGaveUp(
                    path, "actor", services.max_restarts, services.restart_period
                ) from error
            live.restarted(error)
            log.warning(
                "session.actor_restarted",
                session_id=state.session_id,
                path=path,
                error=repr(error),
                exc_info=error,
            )
        else:
            return  # mailbox closed and drained: the session is over
