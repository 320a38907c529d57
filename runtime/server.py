"""The WebSocket endpoint ``ws://HOST:PORT/mcp``, and :class:`Sessions`: its connections'
sessions, contained, counted, refused and drained.

Nothing one connection does reaches another: the accept loop is our own
(:mod:`runtime.listener`), each connection runs contained in its own task and nursery (with
trio-websocket's reader task), and a session runs inside :meth:`Sessions.run`, which is the one
place a session's failure stops: it is logged once with the session id, and only that socket is
closed (1011). The listener and the other sessions never see it. (The session's actor is a
child of the sessions supervisor, ``/root/sessions``, which the session host starts it under:
docs/supervision.md.) Which sessions exist is the node's session registry
(:mod:`runtime.session_registry`), read here through :class:`SessionTable`.

The port also answers ``GET /healthz`` and ``GET /readyz`` (:mod:`runtime.http_dispatch`).

Shutdown (``stop()``) is a drain: ``/readyz`` answers 503 ``draining`` and new sessions (and
resumes) are refused with 503 at once; each session is closed with 1001 as soon as it has
nothing pending (no request queued or running, no reply left unwritten), so the calls in
flight finish and are answered; at ``drain_timeout`` seconds, or at once on
:meth:`Sessions.cut_drain_short` (a second signal), the calls still running are cancelled
(recorded ``cancelled``) and every remaining session is closed with 1001, with ``grace``
seconds to finish its last writes before what remains is cancelled. The listening socket
closes last, so probes see ``draining`` rather than a refused connection throughout.
"""

from __future__ import annotations

import contextlib
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from runtime.auth import ClientTokens, presented_token
from runtime.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INTERNAL_ERROR_REASON,
)
from runtime.handshake_admission import HandshakeAdmission, parse_networks
from runtime.http_dispatch import (
    BadRequest,
    RequestHead,
    answer_plain,
    read_request_head,
    refuse_head,
)
from runtime.keepalive import keep_alive
from runtime.listener import Listener, ListenerCounters, Peer, PeerStream, Release
from runtime.log_throttle import LogThrottle
from runtime.session_registry import CloseConnection, SessionPhase
from runtime.status_model import ListenerStatus
from runtime.streamable_http.endpoint import HttpConfig, HttpSessionHost, StreamableHttpEndpoint
from runtime.streamable_http.origin import OriginPolicy
from runtime.streamable_http.refusal import retry_after
from runtime.streamable_http.session_transport import StreamBounds

log = structlog.get_logger("server")

MCP_PATH = "/mcp"
SUBPROTOCOL = "mcp"
_REQUEST_TIMEOUT_BODY = b"request not complete within the handshake deadline\n"
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REQUEST_TIMEOUT_BODY), _REQUEST_TIMEOUT_BODY)
)
REQUEST_TIMEOUT_SEND_S = 1.0
#: How often a drain looks for sessions that have become idle. Their work (queued requests,
#: calls, unwritten replies) belongs to the actors and signals no event this layer could wait
#: on; a look at a few in-memory collections per session every 50 ms costs nothing, and
#: delays a session's close by 50 ms at most.
DRAIN_POLL_S = 0.05
#: Seconds a peer has to answer a drain's close frame before its TCP connection is dropped
#: (as a session's own close, ``SessionBounds.close_timeout``).
DRAIN_CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the handshake established about a connection before its session started.

    ``identity`` is the client identity the token named (``default`` for the node's own
    token); ``resumed`` is the state a :class:`SessionHost` handed back for a resumed session;
    the server never looks inside it. ``last_sent`` tells when the peer last took bytes from
    the connection (trio's clock, seconds): progress at the transport, finer than whole
    messages.
    """

    session_id: str
    remote: str
    subprotocol: str | None
    identity: str
    resumed: object | None = None
    last_sent: Callable[[], float] | None = None


class ResumeRefused(enum.Enum):
    """Why a resume (a handshake presenting a session id) is refused; the value is the HTTP
    status the handshake answers."""

    UNKNOWN = 404
    """No such session for this identity (unknown, ended, past its resume grace, or another
    identity's: one answer for all, so a stranger learns nothing)."""
    ATTACHED = 409
    """Its client is still connected to it (on this node or another live one)."""
    BUSY = 503
    """This node cannot look it up now (too many lookups of ids it does not hold, or the
    database does not answer): retry later."""


class SessionHost(HttpSessionHost, Protocol):
    """What runs sessions, as the server sees it (the actors implement it): WebSocket
    sessions here, Streamable HTTP ones through :class:`HttpSessionHost`."""

    async def claim(self, session_id: str, identity: str, remote: str) -> object:
        """Hand a detached session's state to a new connection from ``remote``, whichever
        node of the cluster held it; a :class:`ResumeRefused` if it cannot be resumed."""

    async def unclaim(self, resumed: object) -> None:
        """Take back a state :meth:`claim` handed out whose connection failed before
        :meth:`serve` started: it is parked again (or ended if parking has stopped)."""

    async def serve(self, ws: WebSocketConnection, handshake: Handshake) -> None:
        """Run the session to its end; raising ends only this session (see :class:`Sessions`)."""


class SessionWork(Protocol):
    """The work sessions have accepted and not yet answered, as a drain sees it (the actors
    implement it)."""

    def pending(self, session_id: str) -> bool:
        """Whether the session has requests queued or running, or replies not yet written
        to its peer."""

    def cancel_all(self) -> int:
        """Cancel every tool call in flight, as a client's ``notifications/cancelled`` would
        (each is recorded ``cancelled``); returns how many."""


class SessionTable(Protocol):
    """What this module reads of the node's session registry
    (:class:`runtime.session_registry.SessionRegistry`, whatever it keeps per session)."""

    @property
    def attached(self) -> int:
        """Sessions attached to a connection, or claimed by one."""

    def phase(self, session_id: str) -> SessionPhase | None:
        """The session's phase; ``None`` if there is no such session."""

    def connections(self) -> list[tuple[str, CloseConnection]]:
        """``(session_id, close)`` of every attached session."""

    async def wait_drained(self) -> None:
        """Return once no session is attached or claimed."""


class SessionSlot:
    """One connection's place under ``max_sessions``.

    Taken in the same step as the capacity check (:meth:`take`: no checkpoint between
    them, so concurrent handshakes cannot all pass one free place), held for the whole
    connection, and given back exactly once, by the connection's own task when it ends
    (:meth:`release`), whatever path it took.
    """

    __slots__ = ("_sessions", "taken")

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self.taken = False

    def take(self) -> bool:
        """Take the place if the node has one; ``False`` if it is full."""
        if self.taken:
            return True
        if self._sessions.full:
            return False
        self._sessions._taken += 1
        self.taken = True
        return True

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if self.taken:
            self.taken = False
            self._sessions._taken -= 1


class Sessions:
    """Every live session, its failures contained, its shutdown.

    Which sessions exist, and in which phase, is the node's one
    :class:`~runtime.session_registry.SessionRegistry` (the session host writes it); this
    class reads it: the session limit counts its attached sessions, a resume of an attached
    one is refused (409), and the drain closes the attached ones.
    """

    def __init__(self, registry: SessionTable, max_sessions: int) -> None:
        self.registry = registry
        self.max_sessions = max_sessions
        self._cut_short = trio.Event()
        #: Places taken under ``max_sessions`` (:class:`SessionSlot`), each from the
        #: handshake's capacity check to the end of its connection: a new session enters the
        #: registry only once its row is written, and must count before that.
        self._taken = 0

    def __len__(self) -> int:
        """Sessions attached to a connection (or about to be: claimed by a resume)."""
        return self.registry.attached

    @property
    def full(self) -> bool:
        """Whether a new session would pass ``max_sessions``: every place taken by a
        connection (:meth:`slot`), from its handshake's check on, so neither a burst of
        handshakes nor a database slow to record new sessions can pass the limit; and every
        session the registry holds attached or claimed."""
        return max(self._taken, self.registry.attached) >= self.max_sessions

    def slot(self) -> SessionSlot:
        """A connection's place under ``max_sessions``, not yet taken (see
        :class:`SessionSlot`)."""
        return SessionSlot(self)

    def __contains__(self, session_id: str) -> bool:
        """Whether ``session_id`` is attached to a connection (or claimed by one)."""
        return self.registry.phase(session_id) in (SessionPhase.ATTACHED, SessionPhase.CLAIMED)

    async def run(self, host: SessionHost, ws: WebSocketConnection, handshake: Handshake) -> None:
        """Run one session to its end. Never raises: a failure ends this session alone."""
        try:
            await host.serve(ws, handshake)
        except Exception:
            log.exception("session.crashed", session_id=handshake.session_id)
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await ws.aclose(CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON)

    def cut_drain_short(self) -> None:
        """End a drain (now, or the next one) at once, as its deadline would."""
        self._cut_short.set()

    async def drain(
        self, work: SessionWork | None, *, within: float, code: int, reason: str
    ) -> bool:
        """Close each session with ``code`` once ``work`` has nothing pending for it, until
        every session has ended (``True``), or ``within`` seconds pass or
        :meth:`cut_drain_short` is called (``False``)."""
        closing: set[str] = set()
        registry = self.registry
        with trio.move_on_after(within):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, self._cut_short, nursery.cancel_scope)
                while registry.attached:
                    for session_id, close in registry.connections():
                        if session_id in closing:
                            continue
                        if work is None or not work.pending(session_id):
                            closing.add(session_id)
                            nursery.start_soon(_close_within, close, code, reason)
                    with trio.move_on_after(DRAIN_POLL_S):
                        await registry.wait_drained()
                nursery.cancel_scope.cancel()
        return not registry.attached

    async def close_all(self, code: int, reason: str) -> None:
        """Ask every session to end by closing its connection; returns when all have ended."""
        async with trio.open_nursery() as nursery:
            for _, close in self.registry.connections():
                nursery.start_soon(close, code, reason)
        await self.registry.wait_drained()


class McpWebSocketServer:
    """Accepts authenticated WebSocket connections on ``/mcp`` and hands each to a session.

    Each connection, in :meth:`_serve_connection`: the listener (:mod:`runtime.listener`)
    admits it (:mod:`runtime.handshake_admission`) and runs it contained; its request head is
    read (:mod:`runtime.http_dispatch`): a plain HTTP request (``/healthz``, ``/readyz``) is
    answered and the connection closed, an upgrade goes on to trio-websocket, which parses it
    again over the stream, its reader task in a nursery of this connection alone; path,
    draining, token, capacity and resume are checked; the 101 is sent; the handshake's place
    is released; the session runs with :func:`~runtime.keepalive.keep_alive` beside it.

    The handshake (accept to 101 or error response, or to a plain answer) has
    ``handshake_timeout`` seconds; a peer
    that goes away meanwhile is noticed at once (its end of stream or reset), not at the
    deadline, so its descriptor is released as soon as it has gone.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        clients: ClientTokens,
        session_host: SessionHost,
        sessions: Sessions,
        max_message_bytes: int,
        grace: float = 10.0,
        drain_timeout: float = 30.0,
        work: SessionWork | None = None,
        database_ready: Callable[[], Awaitable[bool]] | None = None,
        handshake_timeout: float = 10.0,
        admission: HandshakeAdmission | None = None,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        counters: ListenerCounters | None = None,
        http: HttpConfig | None = None,
        stream_bounds: StreamBounds | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._host = host
        self._clients = clients
        self._session_host = session_host
        self.sessions = sessions
        self._max_message_bytes = max_message_bytes
        self._grace = grace
        self._drain_timeout = drain_timeout
        self._work = work
        self._database_ready = database_ready
        self._handshake_timeout = handshake_timeout
        self.admission = admission or HandshakeAdmission(
            max_total=1024, max_per_address=32, trusted=parse_networks("127.0.0.1,::1")
        )
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self.counters = counters or ListenerCounters()
        self._listener = Listener(
            self._serve_connection,
            gate=self.admission,
            host=host,
            port=port,
            counters=self.counters,
            reuse_port=reuse_port,
        )
        self._throttle = LogThrottle()
        self._stop = trio.Event()
        self.url = ""
        """``ws://HOST:PORT/mcp`` once listening."""
        self.http_url = ""
        """``http://HOST:PORT/mcp`` once listening: Streamable HTTP, the same port and path."""
        http = http or HttpConfig(max_body_bytes=max_message_bytes)
        self.origins: OriginPolicy = http.origins
        #: Streamable HTTP on the same port and path (``runtime.streamable_http``).
        self.http = StreamableHttpEndpoint(
            http,
            clients=clients,
            places=sessions,
            host=session_host,
            stream_bounds=stream_bounds
            or StreamBounds(max_bytes=8 * 2**20, max_messages=1024, stall_timeout=30.0, node=None),
            draining=lambda: self.draining,
        )

    @property
    def draining(self) -> bool:
        """Stopping: ``/readyz`` says so and new sessions are refused."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Begin the shutdown described in the module docstring; ``run`` returns when done."""
        self._stop.set()
        self.http.stop()

    async def readiness(self) -> str | None:
        """What ``/readyz`` answers: ``None`` (ready), ``"draining"`` or ``"database
        unavailable"``."""
        if self.draining:
            return "draining"
        if self._database_ready is not None and not await self._database_ready():
            return "database unavailable"
        return None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; reports the URL through ``task_status`` once listening."""
        async with trio.open_nursery() as connections:
            # HTTP sessions outlast the connection that opened them: they live here too,
            # drained with the WebSocket ones and cancelled with them.
            self.http.bind(connections)
            async with trio.open_nursery() as accepting:
                port = await accepting.start(self._listener.run, connections)
                # An IPv6 literal is bracketed in a URL (RFC 3986 section 3.2.2).
                host = f"[{self._host}]" if ":" in self._host else self._host
                self.url = f"ws://{host}:{port}{MCP_PATH}"
                self.http_url = f"http://{host}:{port}{MCP_PATH}"
                task_status.started(self.url)
                await self._stop.wait()
                await self._drain()
                accepting.cancel_scope.cancel()
            connections.cancel_scope.cancel()

    async def _drain(self) -> None:
        """The shutdown of the module docstring, up to closing the listener."""
        started = trio.current_time()
        log.info("server.draining", sessions=len(self.sessions), deadline=self._drain_timeout)
        reason = "server shutting down"
        if await self.sessions.drain(
            self._work, within=self._drain_timeout, code=CLOSE_GOING_AWAY, reason=reason
        ):
            log.info("server.drained", elapsed_s=round(trio.current_time() - started, 3))
            return
        cancelled = self._work.cancel_all() if self._work is not None else 0
        log.warning(
            "server.drain_cut",
            elapsed_s=round(trio.current_time() - started, 3),
            sessions=len(self.sessions),
            calls_cancelled=cancelled,
        )
        with trio.move_on_after(self._grace):
            await self.sessions.close_all(CLOSE_GOING_AWAY, reason)

    async def _serve_connection(self, stream: PeerStream, peer: Peer, release: Release) -> None:
        """One connection from accept to its end; raising ends this connection only (the
        listener contains and logs it)."""
        slot = self.sessions.slot()
        try:
            await self._serve_opened(stream, peer, release, slot)
        finally:
            slot.release()

    async def _serve_opened(
        self, stream: PeerStream, peer: Peer, release: Release, slot: SessionSlot
    ) -> None:
        async with trio.open_nursery() as connection:  # trio-websocket's reader task lives here
            try:
                opened = await self._open(connection, stream, peer, slot)
            finally:
                release()
            if isinstance(opened, RequestHead):
                # Streamable HTTP: this request, and those after it on this connection.
                await self.http.serve(stream, opened.conn, opened.request, peer)
            elif opened is not None:
                ws, handshake = opened
                connection.start_soon(
                    partial(
                        keep_alive,
                        ws,
                        stream,
                        interval=self._ping_interval,
                        pong_timeout=self._ping_timeout,
                        session_id=handshake.session_id,
                    )
                )
                await self.sessions.run(self._session_host, ws, handshake)
            # The session is over (its socket closed, or given up): stop the reader and the
            # keepalive; the listener closes the socket.
            connection.cancel_scope.cancel()

    async def _open(
        self, connection: trio.Nursery, stream: PeerStream, peer: Peer, slot: SessionSlot
    ) -> tuple[WebSocketConnection, Handshake] | RequestHead | None:
        """The handshake, bounded by the deadline and by the peer's presence: a WebSocket
        session, or a Streamable HTTP request for ``/mcp`` to serve (its head read); ``None``
        if it ended without either (a plain HTTP request answered, refused, timed out, or the
        peer left)."""
        head_read = False
        with trio.move_on_after(self._handshake_timeout) as deadline:
            async with trio.open_nursery() as race:
                race.start_soon(_cancel_when_set, stream.ended, race.cancel_scope)
                head = await read_request_head(stream)
                head_read = head is not None
                opened: tuple[WebSocketConnection, Handshake] | RequestHead | None = None
                if isinstance(head, RequestHead) and head.websocket:
                    request = await wrap_server_stream(
                        connection,
                        head.replay(stream),  # parsed again by wsproto, as if never read
                        max_message_size=self._max_message_bytes,
                        # trio's 64 KiB reads, not trio-websocket's 4 KiB: doubles
                        # throughput for large messages.
                        receive_buffer_size=None,
                    )
                    try:
                        opened = await self._handshake(request, peer, stream, slot)
                    except ConnectionClosed:
                        # The peer left while we answered it (a reset right after its
                        # request): its doing, not a failure of ours.
                        opened = None
                elif isinstance(head, RequestHead) and head.path == MCP_PATH.encode():
                    opened = head
                elif isinstance(head, BadRequest):
                    await refuse_head(stream, head)
                elif head is not None:
                    await answer_plain(stream, head, self.readiness)
                race.cancel_scope.cancel()
                return opened
        if deadline.cancelled_caught:
            self.counters.handshakes_timed_out += 1
            self._throttle.emit(
                log.info, "handshake.timed_out", peer=str(peer), limit=self._handshake_timeout
            )
            if not head_read and not stream.ended.is_set():
                # Its request head never came: 408 (RFC 9110 section 15.5.9), then close. A
                # peer that does not read it gets no longer than this to take it.
                with (
                    trio.move_on_after(REQUEST_TIMEOUT_SEND_S),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await stream.send_all(REQUEST_TIMEOUT_RESPONSE)
        return None

    async def _handshake(
        self, request: WebSocketRequest, peer: Peer, stream: PeerStream, slot: SessionSlot
    ) -> tuple[WebSocketConnection, Handshake] | None:
        """Path, token and capacity are checked before anything else happens; the capacity
        check takes the connection's ``slot`` (released by the caller when it ends)."""
        path = request.path.partition("?")[0]
        if path != MCP_PATH:
            await request.reject(404, body=b"not found: the MCP endpoint is /mcp\n")
            return None
        origin = next((value for name, value in request.headers if name.lower() == b"origin"), None)
        if not self.origins.admits(origin):
            # A browser page's connection (RFC 6455 section 10.2): the DNS rebinding defence
            # MCP asks of every connection (runtime.streamable_http.origin).
            self._throttle.emit(log.info, "handshake.forbidden_origin", peer=str(peer))
            await request.reject(403, body=b"forbidden: this Origin may not use the server\n")
            return None
        if self.draining:
            await request.reject(
                503,
                extra_headers=[(b"retry-after", b"1")],
                body=b"server draining: it is shutting down; connect to another node\n",
            )
            return None
        identity = self._clients.identify(presented_token(request.path, request.headers))
        if identity is None:
            self._throttle.emit(log.info, "handshake.unauthorized", peer=str(peer))
            await request.reject(
                401,
                extra_headers=[(b"www-authenticate", b'Bearer realm="exai"')],
                body=b"unauthorized: present the token as 'Authorization: Bearer' or ?token=\n",
            )
            return None
        if not slot.take():
            self._throttle.emit(
                log.warning,
                "handshake.refused",
                key="handshake.refused:max sessions",
                reason="max sessions",
                limit=self.sessions.max_sessions,
            )
            await request.reject(
                503,
                extra_headers=[(b"retry-after", b"1")],
                body=b"server busy: session limit reached, retry later\n",
            )
            return None
        resume_id = _presented_session_id(request)
        resumed: object | None = None
        if resume_id is not None:
            claimed = await self._session_host.claim(resume_id, identity, str(peer))
            if isinstance(claimed, ResumeRefused):
                await self._refuse_resume(request, resume_id, claimed)
                return None
            resumed = claimed
        try:
            offered = request.proposed_subprotocols
            subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
            session_id = resume_id or str(uuid.uuid4())
            ws = await request.accept(
                subprotocol=subprotocol,
                extra_headers=[(b"mcp-session-id", session_id.encode())],
            )
        except BaseException:
            if resumed is not None:
                # Claimed, but its new connection failed before the session took it over:
                # without this the session would be neither resumable nor ever closed.
                with trio.CancelScope(shield=True):
                    await self._session_host.unclaim(resumed)
            raise
        handshake = Handshake(
            session_id=session_id,
            remote=str(peer),
            subprotocol=subprotocol,
            identity=identity,
            resumed=resumed,
            last_sent=lambda: stream.last_sent,
        )
        return ws, handshake

    async def _refuse_resume(
        self, request: WebSocketRequest, resume_id: str, why: ResumeRefused
    ) -> None:
        """The handshake's answer to a resume that cannot be: 404, 409 or 503."""
        if why is ResumeRefused.ATTACHED:
            body = f"session {resume_id} is attached to another connection\n"
        elif why is ResumeRefused.BUSY:
            body = "server busy: cannot look the session up now, retry later\n"
        else:
            # The id is the client's own text (no session has it): logged under a field a
            # peer writes, so redacted and clipped, not as a session id, which is never masked.
            log.info("handshake.resume_refused", resume_id=resume_id)
            body = (
                f"session {resume_id} is unknown or its resume grace period has passed; "
                "connect without a session id to start a new session\n"
            )
        await _refuse(request, why.value, body, why is not ResumeRefused.UNKNOWN)


async def _refuse(request: WebSocketRequest, status: int, body: str, retry: bool) -> None:
    headers = list(retry_after()) if retry else None
    await request.reject(status, extra_headers=headers, body=body.encode())


def listener_status(
    admission: HandshakeAdmission,
    counters: ListenerCounters,
    http: StreamableHttpEndpoint | None = None,
    *,
    http_connections_max: int | None = None,
) -> ListenerStatus:
    """The listener's part of ``/status`` (and so of ``/metrics``). ``http`` is the running
    server's Streamable HTTP endpoint (``None`` while none runs: no connection is open);
    ``http_connections_max`` its bound (``EXAI_MAX_HTTP_CONNECTIONS``), which outlives it."""
    if http is not None and http_connections_max is None:
        http_connections_max = http.config.max_connections
    return ListenerStatus(
        handshakes_in_progress=admission.in_progress,
        handshakes_max=admission.max_total,
        handshakes_max_per_address=admission.max_per_address,
        handshakes_refused=dict(admission.refused),
        handshakes_timed_out=counters.handshakes_timed_out,
        accept_pauses=counters.accept_pauses,
        failed_accepts=counters.failed_accepts,
        connections_failed=counters.connections_failed,
        http_connections=http.connections if http is not None else 0,
        http_connections_max=http_connections_max,
    )


async def _close_within(close: CloseConnection, code: int, reason: str) -> None:
    """Close a connection; a peer that does not answer the close frame in time has its TCP
    connection dropped (trio-websocket closes the stream when ``aclose`` is cancelled)."""
    with trio.move_on_after(DRAIN_CLOSE_TIMEOUT_S):
        await close(code, reason)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _presented_session_id(request: WebSocketRequest) -> str | None:
    """``Mcp-Session-Id`` header, else ``?session=`` (the official clients set no headers)."""
    for name, value in request.headers:
        if name.lower() == b"mcp-session-id":
            return value.decode("latin-1").strip() or None
    values = parse_qs(urlsplit(request.path).query).get("session")
    return values[0] if values else None
