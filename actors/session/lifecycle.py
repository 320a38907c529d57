"""A session over WebSocket: accepted, run, parked when its socket drops, ended. Each step
is an operation on the node's one session registry (:mod:`runtime.session_registry`):
attach, park, claim, end; its reaper expires parked sessions.

The session itself runs transport-free (:func:`~actors.session.runner.run_session`: its
reader and its supervised actor); what is WebSocket's is here and in
:class:`~runtime.websocket_transport.WebSocketTransport` (its writer, byte budgets, stall
watchdog and close): refusing a session storage cannot record (1013), the meaning of each
close code, and parking. The socket closing (by the client, or by shutdown with 1001) is the
normal end: running tool calls are cancelled, since nobody could receive their answers. A
clean close (1000) ends the session; any other drop parks it for resume. A session the
server ends itself (a peer that stopped reading, a binary or oversized frame) is not parked.
A session whose actor gave up (see ``runner``) is raised to ``runtime.server.Sessions``, which
logs ``session.crashed`` and closes with 1011.

Its end is logged once, as ``session.closed`` (:func:`~actors.session.runner.end_session`),
with how its (last) connection closed: the close code (RFC 6455 section 7.4), a reason (the
close frame's, else the code's name), and how long the session lived.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from actors.persistence import StorageUnavailable
from actors.session.actor import Mail
from actors.session.config import SessionServices
from actors.session.handover import LookupRefused
from actors.session.http import serve_http_session
from actors.session.runner import end_session, open_session, record_end, run_session
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime.budget import ByteBudget
from runtime.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INTERNAL_ERROR_REASON,
    CLOSE_NORMAL,
)
from runtime.mailbox import ActorRef
from runtime.outbox import Outbox
from runtime.server import Handshake, ResumeRefused
from runtime.session_registry import Ending, SessionEntry, SessionPhase
from runtime.streamable_http.endpoint import NotResumable
from runtime.streamable_http.session_transport import HttpSessionTransport
from runtime.websocket_transport import WebSocketTransport
from storage.session_handover import Refusal

log = structlog.get_logger("session")

#: Closes after which a session ends instead of being parked (RFC 6455 section 7.4.1): the
#: client ended it (1000), or the connection broke the protocol (1002), sent what cannot be
#: taken (1003, 1007: not UTF-8 in a text frame; 1009: too big) or was closed for its
#: behaviour (1008). A resume would only meet the same peer; a drop (1006) or a peer going
#: away (1001) is parked.
_ENDS_SESSION = frozenset({CLOSE_NORMAL, 1002, 1003, 1007, 1008, 1009})
CLOSE_TRY_AGAIN_LATER = 1013


def _ending_of(close: CloseReason) -> Ending:
    """How a connection ended, from its close (RFC 6455 section 7.4): the frame's reason,
    else the code's name (``ABNORMAL_CLOSURE``)."""
    return Ending(close.code, close.reason or close.name)


class SessionLifecycle:
    """The :class:`~runtime.server.SessionHost` of this node: runs, parks and resumes sessions.

    With the session runner, the only writer of ``services.registry`` (shared with status
    and the server); it expires the parked ones (:meth:`_expire_parked`).
    """

    def __init__(self, services: SessionServices) -> None:
        self.services = services
        self.registry = services.registry
        self.registry.on_expire = self._expire_parked
        if services.sessions is None:
            raise ValueError("a node's sessions need their supervisor (services.sessions)")
        self.supervisor = services.sessions

    async def claim(self, session_id: str, identity: str, remote: str) -> object:
        """A resume: the session's :class:`LiveSession`, now ``CLAIMED`` for the new
        connection, or a :class:`ResumeRefused`.

        Held here parked: claimed at once, then confirmed in the database at its epoch; a
        copy another node claimed since is dropped (no end written: the session is that
        node's) and the claim goes on as for an id held elsewhere. Held elsewhere (parked on
        another node, or left attached on a dead one): claimed from the database
        (:mod:`actors.session.handover`). Another identity's session is unknown to this
        one, wherever it is held and whatever its phase: 404, as for an id never issued.
        """
        registry = self.registry
        entry = registry.get(session_id)
        if entry is not None:
            if entry.identity != identity:
                return ResumeRefused.UNKNOWN
            if entry.phase is not SessionPhase.PARKED:
                return ResumeRefused.ATTACHED
            live = registry.claim(session_id, identity)
            handover = self.services.handover
            if live is None or handover is None:
                return live or ResumeRefused.UNKNOWN
            if await handover.reclaim(live.state, remote):
                return live
            # Another node claimed it while it was parked here: this copy is stale.
            registry.end(session_id)
            log.info("session.handed_over", session_id=session_id)
            if self.services.session_ended is not None:
                await self.services.session_ended(session_id)
        return await self._claim_elsewhere(session_id, identity, remote)

    async def _claim_elsewhere(self, session_id: str, identity: str, remote: str) -> object:
        handover = self.services.handover
        if handover is None or self.registry.grace <= 0:
            return ResumeRefused.UNKNOWN  # no grace: nothing is parked, nothing resumed
        try:
            claimed = await handover.claim(session_id, identity, remote)
        except LookupRefused:
            return ResumeRefused.BUSY
        if claimed is Refusal.ATTACHED:
            return ResumeRefused.ATTACHED
        if isinstance(claimed, Refusal):  # unknown or absent
            return ResumeRefused.UNKNOWN
        existing = self.registry.get(session_id)
        if existing is not None:
            # Another connection of this node resumed it while this claim was on its way
            # (it was parked meanwhile, so the database gave it to this claim too): the
            # copy here is the session, at the epoch the database has now.
            existing.session.state.claimed(claimed.epoch)
            if existing.phase is SessionPhase.PARKED:
                return self.registry.claim(session_id, identity) or ResumeRefused.UNKNOWN
            return ResumeRefused.ATTACHED
        live = LiveSession(claimed, None, transport="websocket")
        self.registry.adopt(session_id, identity, live)
        return live

    async def unclaim(self, resumed: object) -> None:
        if not isinstance(resumed, LiveSession):
            return
        state = resumed.state
        if self.registry.unclaim(state.session_id):
            if self.services.handover is not None:
                await self.services.handover.publish_park(state)
            return
        # Parking has stopped: the node is shutting down, the session is over.
        entry = self.registry.end(state.session_id)
        if entry is not None:
            await self._expire_parked(entry)

    async def serve_http(
        self,
        transport: HttpSessionTransport,
        *,
        remote: str,
        idle_timeout: float,
        started: Callable[[], None],
        resume: bool = False,
    ) -> None:
        """One Streamable HTTP session (``actors.session.http``); ``resume``: the one of
        the transport's id another node holds or held, claimed from the database."""
        adopted = None
        if resume:
            adopted = await self._claim_http(transport.session_id, transport.identity, remote)
        await serve_http_session(
            self.services,
            self.supervisor,
            transport,
            remote=remote,
            idle_timeout=idle_timeout,
            started=started,
            adopted=adopted,
        )

    async def _claim_http(self, session_id: str, identity: str, remote: str) -> SessionState:
        """A 2025-era HTTP session's state, claimed from its row (whoever holds it: see
        ``storage.session_handover``); :class:`NotResumable` if it cannot be."""
        handover = self.services.handover
        if handover is None or session_id in self.registry:
            raise NotResumable(busy=False)
        try:
            claimed = await handover.claim(session_id, identity, remote, http=True)
        except LookupRefused:
            raise NotResumable(busy=True) from None
        if isinstance(claimed, Refusal):
            raise NotResumable(busy=False)
        return claimed

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
        resumed = handshake.resumed if isinstance(handshake.resumed, LiveSession) else None

        def attach(ref: ActorRef[Mail]) -> LiveSession:
            if resumed is not None:  # its meter and restart count go on
                resumed.mailbox, resumed.outbox = ref, outbox
            live = resumed or LiveSession(state, ref, outbox, transport="websocket")
            self.registry.attach(session_id, handshake.identity, live, transport.close)
            return live

        dropped = gave_up = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    transport.start(nursery)
                    await run_session(
                        services,
                        state,
                        transport,
                        ws.get_message,
                        attach=attach,
                        supervisor=self.supervisor,
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
                if code not in _ENDS_SESSION and not outbox.closed:
                    state.detached()
                    dropped = True
        except* Exception:
            gave_up = True  # the sessions supervisor closes its socket with 1011
            raise
        finally:
            # Whatever ended the session, its queued bytes leave the node's totals now.
            outbox.close()
            ending = self._ending(transport.sent, ws.closed, gave_up=gave_up)
            if session_id in self.registry:  # attached (run_session may fail before)
                await self._detach(state, ending, dropped=dropped)

    async def _detach(self, state: SessionState, ending: Ending, *, dropped: bool) -> None:
        """The connection is over: park the session if it ``dropped`` and may be resumed,
        else end it for good (shielded: this runs on the way out of a cancelled session)."""
        entry = self.registry.get(state.session_id)
        if dropped and self.registry.park(state.session_id, ending):
            if entry is not None:
                entry.session.mailbox = entry.session.outbox = None  # gone with the socket
            if self.services.handover is not None:
                # Any node its client reconnects to may claim it now.
                await self.services.handover.publish_park(state)
            return
        with trio.CancelScope(shield=True):
            await end_session(self.services, state, ending.code, ending.reason)

    async def _begin(self, ws: WebSocketConnection, handshake: Handshake) -> SessionState | None:
        """The state of the session this connection serves: a resumed one, or a new one once
        its row is written; ``None`` if storage refused a new one (closed with 1013)."""
        session_id = handshake.session_id
        if isinstance(handshake.resumed, LiveSession):
            log.info("session.resumed", session_id=session_id, remote=handshake.remote)
            return handshake.resumed.state
        try:
            return await open_session(
                self.services,
                session_id=session_id,
                remote=handshake.remote,
                identity=handshake.identity,
                transport="websocket",
            )
        except StorageUnavailable:
            log.warning("session.refused", session_id=session_id, reason="storage")
            await ws.aclose(CLOSE_TRY_AGAIN_LATER, "storage unavailable; retry later")
            return None

    def _ending(
        self, sent: CloseReason | None, seen: CloseReason | None, *, gave_up: bool
    ) -> Ending:
        """How a connection ended. A close this side starts is known from what it sent:
        trio-websocket reports one as ``1000`` without a reason until the peer's reply (its
        echo, RFC 6455 section 5.5.1) arrives, which the session does not wait for."""
        if sent is not None:
            return _ending_of(sent)
        if gave_up:
            # Raised to the sessions supervisor, which logs it (session.crashed) and closes.
            return Ending(CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON)
        if not self.registry.parking and (
            seen is None or seen.code == CLOSE_GOING_AWAY or _unanswered(seen)
        ):
            return Ending(CLOSE_GOING_AWAY, "server shutting down")  # runtime.server closes
        if seen is None:
            return Ending(None, "connection ended without a close")
        return _ending_of(seen)

    async def _expire_parked(self, entry: SessionEntry[LiveSession]) -> None:
        """A parked session is over (it has left the registry): its grace ran out, or the
        node is stopping."""
        last = entry.ending or Ending(None, "unknown")
        why = "resume grace expired" if self.registry.parking else "server shutting down"
        await record_end(
            self.services,
            entry.session.state,
            last.code,
            f"{why} (detached: {last.reason})",
            opened_at=entry.opened_at,
        )


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
