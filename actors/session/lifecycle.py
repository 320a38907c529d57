"""A session's whole life: recorded on connect, supervised while it runs, parked when its
socket drops (see ``resume``), recorded at its end.

Two tasks serve a connection: the reader (:func:`~actors.session.reader.pump`) and the session
actor, the latter under a one-child supervisor with OTP ``transient`` semantics: a crash is
restarted over the same :class:`SessionState` and mailbox, unless more than ``max_restarts``
crashes fall within ``period`` seconds, in which case the session gives up
(:class:`~runtime.supervision.SupervisorGaveUp`) and the sessions supervisor closes the socket
with 1011. The socket closing (by the client, or by shutdown with 1001) is the normal end:
running tool calls are cancelled, since nobody could receive their answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from actors.persistence import PersistenceClient, StorageUnavailable
from actors.session.actor import Message, SessionActor, SessionConfig, SessionState
from actors.session.reader import pump
from actors.session.resume import ResumableSessions
from actors.status import LiveSession, SessionDirectory
from runtime import trace
from runtime.actor import close_mailbox, run_actor
from runtime.mailbox import ActorRef, Ask, open_mailbox
from runtime.mcp.tools import ToolRegistry
from runtime.server import Handshake
from runtime.supervision.errors import SupervisorGaveUp
from runtime.supervision.intensity import RestartIntensity
from storage.rows import SessionClose, SessionRow

log = structlog.get_logger("session")

CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session is given by the node: shared, never owned by one session."""

    tools: ToolRegistry
    persistence: PersistenceClient
    config: SessionConfig
    mailbox_capacity: int
    max_message_bytes: int
    max_restarts: int
    restart_period: float
    #: Every session of the node, for the status command (actors/status.py).
    directory: SessionDirectory = field(default_factory=SessionDirectory)
    #: Called once a session is over for good (not while it is parked for resume), after its
    #: end is recorded: the rate limiter forgets its counters there.
    session_ended: Callable[[str], Awaitable[None]] | None = None


class SessionLifecycle:
    """The :class:`~runtime.server.SessionHost` of this node: runs, parks and resumes sessions."""

    def __init__(self, services: SessionServices, resume_grace: float) -> None:
        self.services = services
        self.resumable = ResumableSessions(resume_grace, self._expire)

    def claim(self, session_id: str, identity: str) -> SessionState | None:
        return self.resumable.claim(session_id, identity)

    async def unclaim(self, resumed: object) -> None:
        if isinstance(resumed, SessionState) and not self.resumable.park(resumed):
            await self._expire(resumed)  # parking has stopped: the node is shutting down

    async def serve(self, ws: WebSocketConnection, handshake: Handshake) -> None:
        """One connection's session; raises only if the session gave up (see module doc)."""
        services = self.services
        session_id = handshake.session_id
        if isinstance(handshake.resumed, SessionState):
            state = handshake.resumed
            log.info("session.resumed", session_id=session_id, remote=handshake.remote)
        else:
            state = SessionState(
                session_id=session_id, remote=handshake.remote, identity=handshake.identity
            )
            try:
                await services.persistence.write(
                    SessionRow(
                        session_id=session_id,
                        created_at=datetime.now(UTC),
                        remote_addr=handshake.remote,
                        node_id=services.config.node_id,
                    )
                )
            except StorageUnavailable:
                log.warning("session.refused", session_id=session_id, reason="storage")
                await ws.aclose(CLOSE_TRY_AGAIN_LATER, "storage unavailable; retry later")
                return
            log.info(
                "session.opened",
                session_id=session_id,
                remote=handshake.remote,
                identity=handshake.identity,
            )
        path = f"/root/sessions/{session_id}"
        ref: ActorRef[Message]
        inbox: trio.MemoryReceiveChannel[Message | Ask[Message]]
        ref, inbox = open_mailbox(path, services.mailbox_capacity)
        live = services.directory.attach(state, ref)
        postmarks = trace.Postmarks()
        detached = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            _supervise_actor,
                            services,
                            state,
                            ws,
                            inbox,
                            live=live,
                            postmarks=postmarks,
                        )
                    )
                    await pump(
                        ws.get_message,
                        ref,
                        send=ws.send_message,
                        close=ws.aclose,
                        session_id=session_id,
                        queued=state.queued,
                        cancel=state.cancel,
                        max_bytes=services.max_message_bytes,
                        postmarks=postmarks,
                    )
                    nursery.cancel_scope.cancel()
            except* ConnectionClosed as closed:
                # A clean close (1000) is the client ending its session. Anything else (a
                # dropped connection, 1001 going away) may be followed by a resume.
                code = _close_code(closed)
                if code != CLOSE_NORMAL:
                    state.handling.clear()
                    detached = self.resumable.park(state)
                    if detached:
                        services.directory.detach(session_id)
        finally:
            close_mailbox(path, inbox)
            if not detached:
                with trio.CancelScope(shield=True):
                    await self._expire(state)

    async def _expire(self, state: SessionState) -> None:
        """The session is over for good: record its end."""
        self.services.directory.remove(state.session_id)
        closed = datetime.now(UTC)
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await self.services.persistence.write(
                SessionClose(session_id=state.session_id, closed_at=closed, last_activity=closed)
            )
            if self.services.session_ended is not None:
                await self.services.session_ended(state.session_id)
        log.info("session.closed", session_id=state.session_id)


def _close_code(group: BaseExceptionGroup[ConnectionClosed]) -> int | None:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    if isinstance(first, ConnectionClosed) and first.reason is not None:
        return first.reason.code
    return None


async def _supervise_actor(
    services: SessionServices,
    state: SessionState,
    ws: WebSocketConnection,
    inbox: trio.MemoryReceiveChannel[Message | Ask[Message]],
    *,
    live: LiveSession,
    postmarks: trace.Postmarks,
) -> None:
    intensity = RestartIntensity(services.max_restarts, services.restart_period)
    path = f"/root/sessions/{state.session_id}"
    while True:
        actor = SessionActor(
            state,
            ws.send_message,
            services.tools,
            services.persistence,
            services.config,
            mailbox=live.mailbox,
            postmarks=postmarks,
            meter=live.meter,
        )
        try:
            await run_actor(actor, inbox)
        except ConnectionClosed:
            raise  # the socket is gone: not a crash, the end
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
