"""A session run over any transport: its reader, and its actor, a dynamic child of the
sessions supervisor.

The transport (``lifecycle`` for WebSocket, ``memory`` in memory, Streamable HTTP next)
gives a :class:`~runtime.connection.Connection` and a :data:`~runtime.connection.Receive`,
runs its own tasks (a writer, a watchdog) beside :func:`run_session`, and decides what a
dropped connection means (parking for resume is WebSocket's). Nothing here knows the
transport, so a new one needs no change here.

Tasks: the reader (:func:`~actors.session.reader.pump`, run by :func:`run_session`, which
follows the actor's handle through a callback) and the session actor, started by
:func:`run_session` as a dynamic child of the sessions supervisor (``/root/sessions``, a
:class:`~runtime.supervision.Supervisor`; docs/supervision.md): ``transient``, with the
session's own intensity (``max_restarts`` within ``restart_period`` seconds,
:class:`~runtime.supervision.Intensity`). A crash is restarted by that supervisor over the
same :class:`SessionState` and mailbox (logged ``session.actor_restarted``); one crash too
many gives the session up alone (``child.gave_up``): :class:`~runtime.supervision.
SupervisorGaveUp` is raised to the transport, which closes its connection (1011 on
WebSocket), while the supervisor, whose own intensity is never charged, and every other
session go on. The reader's end is the session's: its actor and running tool calls are
cancelled (``terminate_child``; ``shutdown=0``, OTP ``brutal_kill``), since nobody could
receive their answers, and the mailbox is closed (what is left in it becomes dead letters).

A session's rows: :func:`open_session` before it first runs (the ``sessions`` row, awaited:
a session the database does not know is refused), :func:`end_session` once it is over for
good (closed with its totals, logged as ``session.closed``), whatever the transport.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import structlog
import trio

from actors.session.actor import Mail, SessionActor
from actors.session.config import SessionServices
from actors.session.reader import ReaderLimits, pump
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime.actor import close_mailbox, run_actor
from runtime.budget import ByteBudget
from runtime.connection import Connection, ConnectionGone, Receive
from runtime.mailbox import ActorRef, Inbox, open_mailbox
from runtime.supervision import (
    ChildContext,
    ChildExit,
    ChildSpec,
    ExitReason,
    Intensity,
    Restart,
    Supervisor,
    SupervisorGaveUp,
    SupervisorNotRunning,
    UnknownChild,
)
from storage.rows import SessionClose, SessionRow, SessionTransport

__all__ = ["Attach", "end_session", "open_session", "record_end", "run_session"]

log = structlog.get_logger("session")

#: How a transport registers a running session for status: given its mailbox, the entry
#: (``actors.status.LiveSession``) whose meter and restart count the session keeps.
Attach = Callable[[ActorRef[Mail]], LiveSession]


async def open_session(
    services: SessionServices,
    *,
    session_id: str,
    remote: str,
    identity: str,
    sessionless: bool = False,
    transport: SessionTransport,
) -> SessionState:
    """A new session, once its row is written (awaited); logged as ``session.opened``.

    Raises :class:`~actors.persistence.StorageUnavailable` if storage refused it (the
    transport refuses the client: 1013 on WebSocket).
    """
    # No fsync of its own (``journal`` durability): a session row lost with the machine
    # harms no one unless a call of the session was recorded after it, and the journal is
    # one ordered file, so the fsync of that call's intent or final state covers this row
    # too. Written (it survives the process) before the session is answered, as ever; with
    # ``commit`` it is committed. One fdatasync less per session opened: opening 10,000
    # sessions paid 10,000 of them (docs/benchmarks.md, issue 17).
    await services.persistence.write(
        SessionRow(
            session_id=session_id,
            created_at=datetime.now(UTC),
            remote_addr=remote,
            node_id=services.config.node_id,
            identity=identity,
            transport=transport,
        ),
        fsync=False,
    )
    log.info("session.opened", session_id=session_id, remote=remote, identity=identity)
    return SessionState(
        session_id=session_id,
        remote=remote,
        identity=identity,
        sessionless=sessionless,
        any_node=transport == "http",
    )


async def run_session(
    services: SessionServices,
    state: SessionState,
    connection: Connection,
    receive: Receive,
    *,
    attach: Attach,
    supervisor: Supervisor,
) -> None:
    """Run the session over ``connection`` until its reader ends (see the module doc), its
    actor a child of ``supervisor`` (running: else :class:`SupervisorNotRunning`).

    Returns when the peer has gone plainly (``ConnectionGone``), the session closed the
    connection itself (a frame it refuses), or the connection stopped being writable for
    good. Raises what ``receive`` raises when the peer goes, and
    :class:`~runtime.supervision.SupervisorGaveUp`, bare or inside an exception group.
    """
    session_id = state.session_id
    path = f"{supervisor.path}/{session_id}"
    bounds = services.bounds
    ref: ActorRef[Mail]
    inbox: Inbox[Mail]
    ref, inbox = open_mailbox(
        path,
        services.mailbox_capacity,
        budget=ByteBudget(bounds.mailbox_bytes, bounds.node_mailbox),
    )
    try:
        live = attach(ref)
        actor = partial(_actor, services, state, connection, inbox, live=live)
        handle = await supervisor.start_child(
            ChildSpec(
                session_id,
                actor,
                restart=Restart.TRANSIENT,
                shutdown=0,
                intensity=Intensity(services.max_restarts, services.restart_period),
            )
        )
        try:
            with trio.CancelScope() as reading:
                follower = _ActorFollower(reading)
                handle.on_exit(follower)
                await pump(
                    receive,
                    ref,
                    connection=connection,
                    state=state,
                    limits=ReaderLimits(services.max_message_bytes, bounds.max_batch),
                    meter=live.meter,
                )
            if follower.gave_up is None and not reading.cancelled_caught:
                # The reader ended because the connection did (the client left, a DELETE):
                # the calls the actor's end cuts short next were its client's to cancel.
                state.client_left = "its client left (the connection ended)"
            if follower.gave_up is not None:
                raise SupervisorGaveUp(
                    handle.path, "actor", services.max_restarts, services.restart_period
                ) from follower.gave_up.error
        finally:
            # Shielded: a cancelled session must not leave its actor behind.
            with (
                trio.CancelScope(shield=True),
                contextlib.suppress(UnknownChild, SupervisorNotRunning),
            ):
                await supervisor.terminate_child(session_id)
    except* ConnectionGone:
        # A call that found the connection gone while the session was being cancelled (a
        # tool sending progress, say): the connection going away is the end, not a crash.
        pass
    finally:
        close_mailbox(path, inbox)


async def end_session(
    services: SessionServices,
    state: SessionState,
    code: int | None,
    reason: str,
    *,
    everywhere: bool = False,
) -> None:
    """The session is over for good: record its end, with its totals as they are now, tell
    ``session_ended`` (the rate limiter), and log ``session.closed`` with how its (last)
    connection closed: ``code`` (RFC 6455 section 7.4, ``None`` if no close was seen),
    ``reason``, and how long the session lived (``duration_s``, from its first connection,
    across resumes). It leaves the registry first. Shielded, and bounded to 10 seconds.
    ``everywhere``: its client ended it (a 2025-era HTTP DELETE), so the row ends even if
    another node claimed it since this copy's epoch (``SessionClose.ended_by_client``)."""
    entry = services.registry.end(state.session_id)
    await record_end(
        services,
        state,
        code,
        reason,
        opened_at=entry.opened_at if entry is not None else None,
        everywhere=everywhere,
    )


async def record_end(
    services: SessionServices,
    state: SessionState,
    code: int | None,
    reason: str,
    *,
    opened_at: float | None,
    everywhere: bool = False,
) -> None:
    """:func:`end_session` for a session that has already left the registry (the reaper's
    expiry): ``opened_at`` is its entry's (``time.monotonic()``), for ``duration_s``."""
    closed = datetime.now(UTC)
    with trio.move_on_after(10) as scope:
        scope.shield = True
        record = SessionClose(
            session_id=state.session_id,
            closed_at=closed,
            last_activity=closed,
            tool_calls=state.tool_calls,
            tool_errors=state.tool_errors,
            epoch=state.epoch,
            ended_by_client=everywhere,
        )
        if state.any_node:
            # Another node would take over a row still active (a 2025-era HTTP session's
            # next request may land anywhere): its end is in the database before it is over.
            await services.persistence.write_committed(record)
        else:
            await services.persistence.write(record)
        if services.session_ended is not None:
            await services.session_ended(state.session_id)
    log.info(
        "session.closed",
        session_id=state.session_id,
        code=code,
        reason=reason,
        duration_s=round(time.monotonic() - opened_at, 3) if opened_at is not None else None,
    )


async def _actor(
    services: SessionServices,
    state: SessionState,
    connection: Connection,
    inbox: Inbox[Mail],
    ctx: ChildContext,
    *,
    live: LiveSession,
) -> None:
    """One incarnation of the session actor: the start function of its child spec.

    Returns (a normal exit: ``transient``, so not restarted) once its mailbox is closed and
    drained, or when the connection is going away; raises on a crash, which its supervisor
    restarts within the session's intensity (``ctx.last_error`` is that crash)."""
    error = ctx.last_error
    if error is not None:
        live.restarted(error)
        log.warning(
            "session.actor_restarted",
            session_id=state.session_id,
            path=ctx.path,
            error=repr(error),
            # Also in the supervisor's child.crashed, but that one carries no session id:
            # `exai trace --session` shows this one.
            exc_info=error,
        )
    actor = SessionActor(
        state,
        connection,
        services.tools,
        services.persistence,
        services.config,
        mailbox=live.mailbox,
        meter=live.meter,
        refusals=live.refusals,
    )
    ctx.started()
    try:
        await run_actor(actor, inbox)
    except ConnectionGone:
        return  # the connection is going away: not a crash, the end


class _ActorFollower:
    """The actor's ``on_exit`` (its handle's, called by the supervisor; a callback, not a task
    per session): an actor that gave up, or that its supervisor stopped (the node is
    stopping), ends the reading, and :func:`run_session` then raises
    :class:`SupervisorGaveUp` for the first (the transport closes 1011). A normal end (its
    mailbox closed, or the connection going away) leaves the reader to finish."""

    __slots__ = ("gave_up", "reading")

    def __init__(self, reading: trio.CancelScope) -> None:
        self.reading = reading
        self.gave_up: ChildExit | None = None

    def __call__(self, exit: ChildExit) -> None:
        if exit.reason is ExitReason.GAVE_UP:
            self.gave_up = exit
        if exit.reason is not ExitReason.NORMAL:
            self.reading.cancel()
