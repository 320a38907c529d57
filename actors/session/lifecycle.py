"""A session over WebSocket: accepted, run, parked when its socket drops (see ``resume``),
ended.

The session itself runs transport-free (:func:`~actors.session.runner.run_session`: its
reader and its supervised actor); what is WebSocket's is here and in
:class:`~runtime.websocket_transport.WebSocketTransport` (its writer, byte budgets, stall
watchdog and close): refusing a session storage cannot record (1013), the meaning of each
close code, and parking. The socket closing (by the client, or by shutdown with 1001) is the
normal end: running tool calls are cancelled, since nobody could receive their answers. A
clean close (1000) ends the session; any other drop parks it for resume. A session the
server ends itself (a peer that stopped reading, a binary or oversized frame) is not parked.
A session whose actor gave up is raised to the sessions supervisor, which closes with 1011.

Its end is logged once, as ``session.closed`` (:func:`~actors.session.runner.end_session`),
with how its (last) connection closed: the close code (RFC 6455 section 7.4), a reason (the
close frame's, else the code's name), and how long the session lived.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from actors.persistence import StorageUnavailable
from actors.session.config import SessionServices
from actors.session.resume import ResumableSessions
from actors.session.runner import end_session, open_session, run_session
from actors.session.state import SessionState
from runtime.budget import ByteBudget
from runtime.outbox import Outbox
from runtime.server import CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, Handshake
from runtime.websocket_transport import WebSocketTransport

log = structlog.get_logger("session")

CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class _Ending:
    """How a session's connection ended, for ``session.closed``."""

    #: The close code (RFC 6455 section 7.4.1); ``None`` if no close was seen at all.
    code: int | None
    #: The close frame's reason, else the code's name (``ABNORMAL_CLOSURE``), else why.
    reason: str

    @classmethod
    def of(cls, close: CloseReason) -> _Ending:
        return cls(close.code, close.reason or close.name)


class SessionLifecycle:
    """The :class:`~runtime.server.SessionHost` of this node: runs, parks and resumes sessions."""

    def __init__(self, services: SessionServices, resume_grace: float) -> None:
        self.services = services
        self.resumable = ResumableSessions(resume_grace, self._expire_parked)
        #: How the connection of each parked session ended (for its ``session.closed``).
        self._parked_endings: dict[str, _Ending] = {}

    def claim(self, session_id: str, identity: str) -> SessionState | None:
        return self.resumable.claim(session_id, identity)

    async def unclaim(self, resumed: object) -> None:
        if isinstance(resumed, SessionState) and not self.resumable.park(resumed):
            await self._expire_parked(resumed)  # parking has stopped: the node is shutting down

    async def serve(self, ws: WebSocketConnection, handshake: Handshake) -> None:
        """One connection's session; raises only if the session gave up (see module doc)."""
        services = self.services
        session_id = handshake.session_id
        state = await self._begin(ws, handshake)
        if state is None:
            return
        bounds = services.bounds
        outbox = Outbox(
            ByteBudget(bounds.outgoing_bytes, bounds.node_outgoing),
            max_messages=bounds.outgoing_messages,
            stall_timeout=bounds.stall_timeout,
            peer_took=handshake.last_sent,
        )
        transport = WebSocketTransport(
            ws, outbox, close_timeout=bounds.close_timeout, session_id=session_id
        )
        detached = gave_up = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(transport.run)
                    await run_session(
                        services,
                        state,
                        transport,
                        ws.get_message,
                        attach=lambda ref: services.directory.attach(state, ref, outbox),
                    )
                    # The reader stopped because the outbox closed for a peer that does
                    # not read: let the 1008 close (bounded by close_timeout) finish.
                    await transport.settle()
                    nursery.cancel_scope.cancel()
            except* ConnectionClosed as closed:
                # A clean close (1000) is the client ending its session, and a session the
                # server closed itself (the outbox is closed first) is over too. Anything
                # else (a dropped connection, 1001 going away) may be followed by a resume.
                code = _close_code(closed)
                if code != CLOSE_NORMAL and not outbox.closed:
                    state.detached()
                    detached = self.resumable.park(state)
                    if detached:
                        services.directory.detach(session_id)
        except* Exception:
            gave_up = True  # the sessions supervisor closes its socket with 1011
            raise
        finally:
            # Whatever ended the session, its queued bytes leave the node's totals now.
            outbox.close()
            ending = self._ending(transport.sent, ws.closed, gave_up=gave_up)
            if detached:
                self._parked_endings[session_id] = ending
            else:
                with trio.CancelScope(shield=True):
                    await self._expire(state, ending)

    async def _begin(self, ws: WebSocketConnection, handshake: Handshake) -> SessionState | None:
        """The state of the session this connection serves: a resumed one, or a new one once
        its row is written; ``None`` if storage refused a new one (closed with 1013)."""
        session_id = handshake.session_id
        if isinstance(handshake.resumed, SessionState):
            self._parked_endings.pop(session_id, None)
            log.info("session.resumed", session_id=session_id, remote=handshake.remote)
            return handshake.resumed
        try:
            return await open_session(
                self.services,
                session_id=session_id,
                remote=handshake.remote,
                identity=handshake.identity,
            )
        except StorageUnavailable:
            log.warning("session.refused", session_id=session_id, reason="storage")
            await ws.aclose(CLOSE_TRY_AGAIN_LATER, "storage unavailable; retry later")
            return None

    def _ending(
        self, sent: CloseReason | None, seen: CloseReason | None, *, gave_up: bool
    ) -> _Ending:
        """How a connection ended. A close this side starts is known from what it sent:
        trio-websocket reports one as ``1000`` without a reason until the peer's reply (its
        echo, RFC 6455 section 5.5.1) arrives, which the session does not wait for."""
        if sent is not None:
            return _Ending.of(sent)
        if gave_up:
            # Raised to the sessions supervisor, which logs it (session.crashed) and closes.
            return _Ending(CLOSE_INTERNAL_ERROR, "internal error; see session.crashed")
        if not self.resumable.parking and (
            seen is None or seen.code == CLOSE_GOING_AWAY or _unanswered(seen)
        ):
            return _Ending(CLOSE_GOING_AWAY, "server shutting down")  # runtime.server closes
        if seen is None:
            return _Ending(None, "connection ended without a close")
        return _Ending.of(seen)

    async def _expire_parked(self, state: SessionState) -> None:
        """A parked session is over: its grace ran out, or the node is stopping."""
        last = self._parked_endings.pop(state.session_id, _Ending(None, "unknown"))
        why = "resume grace expired" if self.resumable.parking else "server shutting down"
        await self._expire(state, _Ending(last.code, f"{why} (detached: {last.reason})"))

    async def _expire(self, state: SessionState, ending: _Ending) -> None:
        """The session is over for good (see :func:`~actors.session.runner.end_session`)."""
        await end_session(self.services, state, ending.code, ending.reason)


def _close_code(group: BaseExceptionGroup[ConnectionClosed]) -> int | None:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    if isinstance(first, ConnectionClosed) and first.reason is not None:
        return first.reason.code
    return None


def _unanswered(seen: CloseReason) -> bool:
    """What trio-websocket reports for a close this side started, until the peer answers."""
    return bool(seen.code == CLOSE_NORMAL and not seen.reason)
