"""A session's whole life: recorded on connect, supervised while it runs, parked when its
socket drops (see ``resume``), recorded at its end. Each step is an operation on the node's
one session registry (:mod:`runtime.session_registry`): attach, park, claim, end.

Three tasks serve a connection: the reader (:func:`~actors.session.reader.pump`), the writer
(:meth:`~runtime.outbox.Outbox.run`, which drains the session's outgoing queue to the socket)
and the session actor, the latter under a one-child supervisor with OTP ``transient``
semantics: a crash is restarted over the same :class:`SessionState` and mailbox, unless more
than ``max_restarts`` crashes fall within ``period`` seconds, in which case the session gives up
(:class:`~runtime.supervision.SupervisorGaveUp`) and the sessions supervisor closes the socket
with 1011. The socket closing (by the client, or by shutdown with 1001) is the normal end:
running tool calls are cancelled, since nobody could receive their answers. A session the
server ends itself (a peer that stopped reading, a binary or oversized frame) is not parked.

Its end is logged once, as ``session.closed``, with how its (last) connection closed: the close
code (RFC 6455 section 7.4), a reason (the close frame's, else the code's name), and how long
the session lived (``duration_s``, from its first connection, across resumes).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import structlog
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from actors.persistence import PersistenceClient, StorageUnavailable
from actors.session.actor import Message, SessionActor, SessionConfig, SessionState
from actors.session.reader import ReaderLimits, pump
from actors.status import LiveSession
from runtime import trace
from runtime.actor import close_mailbox, run_actor
from runtime.budget import ByteBudget, NodeBudget
from runtime.mailbox import ActorRef, Inbox, open_mailbox
from runtime.mcp.tools import ToolRegistry
from runtime.outbox import Outbox, OutboxClosed
from runtime.server import CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, Handshake
from runtime.session_registry import Ending, SessionEntry, SessionRegistry
from runtime.supervision.errors import SupervisorGaveUp
from runtime.supervision.intensity import RestartIntensity
from storage.rows import SessionClose, SessionRow

log = structlog.get_logger("session")

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


def _ending_of(close: CloseReason) -> Ending:
    """How a connection ended, from its close (RFC 6455 section 7.4): the frame's reason,
    else the code's name (``ABNORMAL_CLOSURE``)."""
    return Ending(close.code, close.reason or close.name)


@dataclass(frozen=True, slots=True)
class SessionBounds:
    """What one session may hold, in items and bytes, and the node-wide byte budgets all
    sessions share (docs/operations.md, "Limits")."""

    #: Bytes of requests waiting in one session's mailbox (beyond: "server busy").
    mailbox_bytes: int = 8 * 2**20
    #: Bytes not yet taken by one session's peer (beyond: the session stops reading).
    outgoing_bytes: int = 8 * 2**20
    #: Messages not yet taken by one session's peer.
    outgoing_messages: int = 1024
    #: Seconds a peer may take nothing while output waits for it before it is closed (1008).
    stall_timeout: float = 30.0
    #: Seconds the close frame to such a peer may take before the TCP connection is dropped.
    close_timeout: float = 5.0
    #: Most members of one JSON-RPC batch.
    max_batch: int = 64
    #: Mailboxes of every session together.
    node_mailbox: NodeBudget = field(default_factory=lambda: NodeBudget("mailbox", 256 * 2**20))
    #: Outgoing queues of every session together.
    node_outgoing: NodeBudget = field(default_factory=lambda: NodeBudget("outgoing", 256 * 2**20))


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
    bounds: SessionBounds = field(default_factory=SessionBounds)
    #: Called once a session is over for good (not while it is parked for resume), after its
    #: end is recorded: the rate limiter forgets its counters there.
    session_ended: Callable[[str], Awaitable[None]] | None = None


class SessionLifecycle:
    """The :class:`~runtime.server.SessionHost` of this node: runs, parks and resumes sessions.

    The only writer of ``registry`` (the node's sessions, shared with status and the
    server); it expires the parked ones through :meth:`_expire_parked`.
    """

    def __init__(self, services: SessionServices, registry: SessionRegistry[LiveSession]) -> None:
        self.services = services
        self.registry = registry
        registry.on_expire = self._expire_parked

    def claim(self, session_id: str, identity: str) -> LiveSession | None:
        return self.registry.claim(session_id, identity)

    async def unclaim(self, resumed: object) -> None:
        if not isinstance(resumed, LiveSession):
            return
        if not self.registry.unclaim(resumed.state.session_id):
            # Parking has stopped: the node is shutting down, the session is over.
            entry = self.registry.end(resumed.state.session_id)
            if entry is not None:
                await self._expire_parked(entry)

    async def serve(self, ws: WebSocketConnection, handshake: Handshake) -> None:
        """One connection's session; raises only if the session gave up (see module doc)."""
        services = self.services
        session_id = handshake.session_id
        state = await self._begin(ws, handshake)
        if state is None:
            return
        path = f"/root/sessions/{session_id}"
        bounds = services.bounds
        ref: ActorRef[Message]
        inbox: Inbox[Message]
        ref, inbox = open_mailbox(
            path,
            services.mailbox_capacity,
            budget=ByteBudget(bounds.mailbox_bytes, bounds.node_mailbox),
        )
        outbox = Outbox(
            ByteBudget(bounds.outgoing_bytes, bounds.node_outgoing),
            max_messages=bounds.outgoing_messages,
            stall_timeout=bounds.stall_timeout,
            peer_took=handshake.last_sent,
        )
        if isinstance(handshake.resumed, LiveSession):
            live = handshake.resumed  # its meter and restart count go on
            live.mailbox, live.outbox = ref, outbox
        else:
            live = LiveSession(state, ref, outbox)
        postmarks = trace.Postmarks()
        closed_for_stall = trio.Event()
        close = _Closer(ws, bounds.close_timeout)
        self.registry.attach(session_id, handshake.identity, live, close)
        dropped = gave_up = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            _supervise_actor,
                            services,
                            state,
                            outbox,
                            inbox,
                            live=live,
                            postmarks=postmarks,
                        )
                    )
                    nursery.start_soon(outbox.run, ws.send_message)
                    nursery.start_soon(
                        _end_when_stalled, outbox, close, session_id, closed_for_stall
                    )
                    await pump(
                        ws.get_message,
                        ref,
                        outbox=outbox,
                        close=close,
                        state=state,
                        limits=ReaderLimits(services.max_message_bytes, bounds.max_batch),
                        postmarks=postmarks,
                        meter=live.meter,
                    )
                    if outbox.stalled.is_set():
                        # The reader stopped because the outbox closed for a peer that does
                        # not read: let the 1008 close (bounded by close_timeout) finish.
                        await closed_for_stall.wait()
                    nursery.cancel_scope.cancel()
            except* ConnectionClosed as closed:
                # A clean close (1000) is the client ending its session, and a session the
                # server closed itself (the outbox is closed first) is over too. Anything
                # else (a dropped connection, 1001 going away) may be followed by a resume.
                code = _close_code(closed)
                if code != CLOSE_NORMAL and not outbox.closed:
                    state.handling.clear()
                    dropped = True
        except* Exception:
            gave_up = True  # the sessions supervisor closes its socket with 1011
            raise
        finally:
            # Whatever ended the session, its queued bytes leave the node's totals now.
            outbox.close()
            close_mailbox(path, inbox)
            ending = self._ending(close.sent, ws.closed, gave_up=gave_up)
            await self._detach(live, ending, dropped=dropped)

    async def _detach(self, live: LiveSession, ending: Ending, *, dropped: bool) -> None:
        """The connection is over: park the session if it ``dropped`` and may be resumed,
        else end it for good and record its end (shielded: this runs on the way out of a
        cancelled session too)."""
        session_id = live.state.session_id
        if dropped and self.registry.park(session_id, ending):
            live.mailbox = live.outbox = None  # they went with the connection
            return
        entry = self.registry.end(session_id)
        if entry is not None:
            with trio.CancelScope(shield=True):
                await self._finish(entry, ending)

    async def _begin(self, ws: WebSocketConnection, handshake: Handshake) -> SessionState | None:
        """The state of the session this connection serves: a resumed one, or a new one once
        its row is written; ``None`` if storage refused a new one (closed with 1013)."""
        session_id = handshake.session_id
        if isinstance(handshake.resumed, LiveSession):
            log.info("session.resumed", session_id=session_id, remote=handshake.remote)
            return handshake.resumed.state
        try:
            await self.services.persistence.write(
                SessionRow(
                    session_id=session_id,
                    created_at=datetime.now(UTC),
                    remote_addr=handshake.remote,
                    node_id=self.services.config.node_id,
                )
            )
        except StorageUnavailable:
            log.warning("session.refused", session_id=session_id, reason="storage")
            await ws.aclose(CLOSE_TRY_AGAIN_LATER, "storage unavailable; retry later")
            return None
        log.info(
            "session.opened",
            session_id=session_id,
            remote=handshake.remote,
            identity=handshake.identity,
        )
        return SessionState(
            session_id=session_id, remote=handshake.remote, identity=handshake.identity
        )

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
            return Ending(CLOSE_INTERNAL_ERROR, "internal error; see session.crashed")
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
        await self._finish(entry, Ending(last.code, f"{why} (detached: {last.reason})"))

    async def _finish(self, entry: SessionEntry[LiveSession], ending: Ending) -> None:
        """The session is over for good and has left the registry: record its end, with its
        totals as they are now."""
        state = entry.session.state
        closed = datetime.now(UTC)
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await self.services.persistence.write(
                SessionClose(
                    session_id=state.session_id,
                    closed_at=closed,
                    last_activity=closed,
                    tool_calls=state.tool_calls,
                    tool_errors=state.tool_errors,
                )
            )
            if self.services.session_ended is not None:
                await self.services.session_ended(state.session_id)
        log.info(
            "session.closed",
            session_id=state.session_id,
            code=ending.code,
            reason=ending.reason,
            duration_s=round(time.monotonic() - entry.opened_at, 3),
        )


def _close_code(group: BaseExceptionGroup[ConnectionClosed]) -> int | None:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    if isinstance(first, ConnectionClosed) and first.reason is not None:
        return first.reason.code
    return None


async def _end_when_stalled(
    outbox: Outbox, close: _Closer, session_id: str, done: trio.Event
) -> None:
    """End the session once its peer is found not reading (:attr:`Outbox.stalled`): 1008,
    and no parking, since a resumed session would only stall again. Sets ``done`` once the
    close is over."""
    await outbox.stalled.wait()
    try:
        log.warning(
            "session.peer_not_reading",
            session_id=session_id,
            queued_bytes=outbox.queued_bytes,
            queued_messages=len(outbox),
            stall_timeout=outbox.stall_timeout,
        )
        outbox.close()
        await close(CLOSE_POLICY_VIOLATION, "not reading replies")
    finally:
        done.set()


def _unanswered(seen: CloseReason) -> bool:
    """What trio-websocket reports for a close this side started, until the peer answers."""
    return bool(seen.code == CLOSE_NORMAL and not seen.reason)


class _Closer:
    """Closes a session's socket from this side, remembering the first close it sent (see
    :meth:`SessionLifecycle._ending`)."""

    __slots__ = ("_within", "_ws", "sent")

    def __init__(self, ws: WebSocketConnection, within: float) -> None:
        self._ws = ws
        self._within = within
        self.sent: CloseReason | None = None

    async def __call__(self, code: int, reason: str) -> None:
        """Close with ``code``; a peer that does not take the close frame within ``within``
        seconds (it is not reading) has its TCP connection dropped instead (trio-websocket
        closes the stream when ``aclose`` is cancelled)."""
        if self.sent is None:
            self.sent = CloseReason(code, reason)
        with trio.move_on_after(self._within):
            await self._ws.aclose(code, reason)


async def _supervise_actor(
    services: SessionServices,
    state: SessionState,
    outbox: Outbox,
    inbox: Inbox[Message],
    *,
    live: LiveSession,
    postmarks: trace.Postmarks,
) -> None:
    intensity = RestartIntensity(services.max_restarts, services.restart_period)
    path = f"/root/sessions/{state.session_id}"
    while True:
        actor = SessionActor(
            state,
            outbox,
            services.tools,
            services.persistence,
            services.config,
            mailbox=live.mailbox,
            postmarks=postmarks,
            meter=live.meter,
        )
        try:
            await run_actor(actor, inbox)
        except OutboxClosed:
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
