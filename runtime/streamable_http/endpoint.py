"""``http://HOST:PORT/mcp``: MCP's Streamable HTTP transport, both eras.

The same port and path as the WebSocket endpoint: ``runtime.server`` reads each connection's
first request head (``runtime.http_dispatch``) and hands a plain (not upgrading) request for
``/mcp`` here, with the connection; this module serves it and whatever requests follow on
that kept-alive connection. The rules are the spec's (modelcontextprotocol/
modelcontextprotocol, ``docs/specification/2025-11-25/basic/transports.mdx``, "Streamable
HTTP"); in order, for every request:

1. ``Origin`` present and not allowed: 403 (:mod:`runtime.streamable_http.origin`).
2. No valid token (``Authorization: Bearer`` or ``?token=``, as the WebSocket handshake):
   401 with ``WWW-Authenticate: Bearer``. Draining: 503 with ``Retry-After``. More than
   ``EXAI_HTTP_EXCHANGES_PER_IDENTITY`` requests of the identity in progress: 429.
3. ``POST``: ``Content-Type: application/json`` (else 415) and an ``Accept`` admitting both
   ``application/json`` and ``text/event-stream``, ``q=0`` meaning "not" (else 406); a body
   of at most ``max_message_bytes`` (413), arriving within ``body_timeout`` (408); one
   JSON-RPC message (not JSON: 400 and -32700; not JSON-RPC, or a batch, which 2025-06-18
   removed: 400 and -32600); an ``MCP-Protocol-Version`` header, if sent, that this server
   speaks (400).

   * A request without ``Mcp-Session-Id`` that names a 2026-07-28 version (in its ``_meta``
     or its ``MCP-Protocol-Version``), or the ``server/discover`` probe, is *sessionless*:
     its mirrored headers are checked against its body
     (:func:`~runtime.streamable_http.headers.check_mirrored_headers`: 400 and -32020 or
     -32022), and it is served by its client identity's own session actor, started on
     demand under ``max_sessions`` and ended by the same idle expiry, so that identities
     never share a mailbox or in-flight slots; any client of the identity may reach it, and
     their ids are renamed so that they never collide. No session id is minted or echoed.
     An unknown method is 404 with its -32601; closing the response stream cancels the
     request (that era's cancellation); a notification is taken (202) and dropped.
   * ``initialize`` without ``Mcp-Session-Id`` starts a 2025-era session: the same supervised
     session actor a WebSocket connection gets (``SessionHost.serve_http``), under the same
     ``max_sessions`` (503) and, per client identity, ``EXAI_HTTP_SESSIONS_PER_IDENTITY``
     (429); its id comes back in ``Mcp-Session-Id``. Storage refusing it: 503.
   * Anything else needs ``Mcp-Session-Id`` (400 without it: the spec's SHOULD); an id this
     node does not hold, or one that belongs to another identity, is 404 (the client then
     starts a new session, as the spec tells it to).
   * A request is answered on this POST: ``application/json`` when its response is the
     first thing the session sends for it, else an SSE stream (its progress and log
     notifications, then the response, then the end). A stream that stays quiet gets a
     keep-alive comment every ``sse_keepalive`` seconds (the first one turns a pending JSON
     answer into a stream). A request id already in flight in the session: 409, with the
     JSON-RPC error. A notification or a client's response: 202 once the session has it.
4. ``GET``: the session's listen stream (SSE) for messages related to no request; one at a
   time (a new one replaces the one open, which ends). ``DELETE``: the session ends (200);
   its end is recorded as a WebSocket close 1000 is. Both need ``Mcp-Session-Id`` (400); a
   2026-07-28 client, which has neither, gets 405.
5. Other methods: 405 with ``Allow``. Other paths: 404. A WebSocket upgrade, which only a
   connection's first request gets (``runtime.http_dispatch``), as a later request of a
   kept-alive connection: 400, -32600, and the connection is closed (``_exchange``).

Every refusal carries a JSON-RPC error with ``id: null`` (the spec's MAY) and is logged at
most once per kind of refusal per period (:class:`~runtime.log_throttle.LogThrottle`).

A session lives in the server's ``sessions`` nursery (it outlasts the connection that
started it) until DELETE, ``idle_timeout`` seconds with no exchange open and no request, the
drain, or a crash (contained: ``session.crashed``, the session alone ends). Exchanges never
hold up one another: each connection is its own task, and each request's stream its own
bounded queue (``runtime.streamable_http.session_transport``).

A 2025-era client that closes a POST's connection before its response does not cancel the
request (that spec: disconnection "SHOULD NOT be interpreted as the client cancelling"): the
call runs to its end and its row records the result. No event ids are sent: streams are not
resumable (optional in 2025-11-25, removed in 2026-07-28).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import h11
import pydantic_core
import structlog
import trio

from runtime.auth import ClientTokens, presented_token
from runtime.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INTERNAL_ERROR_REASON,
    CLOSE_NORMAL,
    ConnectionGone,
    message_size,
)
from runtime.http_dispatch import asks_websocket
from runtime.listener import SEND_CHUNK, Peer, PeerStream
from runtime.log_throttle import LogThrottle
from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import (
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    MissingRequiredClientCapability,
    ParseError,
    RpcError,
    ServerBusy,
    Unavailable,
)
from runtime.streamable_http import sse
from runtime.streamable_http.headers import (
    VERSION_HEADER,
    check_mirrored_headers,
    check_version,
    header_text,
    is_modern,
    renamed,
)
from runtime.streamable_http.origin import OriginPolicy
from runtime.streamable_http.refusal import RETRY_AFTER_S, Refusal, retry_after
from runtime.streamable_http.session_transport import (
    HttpSessionTransport,
    ResponseStream,
    StreamBounds,
    StreamInUse,
)
from runtime.streamable_http.stream_writer import JSON, KEEPALIVE_MARK, SSE_HEADERS, StreamWriter
from runtime.streamable_http.wire import BodyTooLarge, HttpWire, PeerGone, header
from storage.errors import StorageUnavailable

__all__ = ["HttpConfig", "HttpSessionHost", "SessionPlaces", "StreamableHttpEndpoint"]

log = structlog.get_logger("http")

MCP_PATH = b"/mcp"
SESSION_HEADER = b"mcp-session-id"
ALLOW = (b"allow", b"GET, POST, DELETE")
CANCELLED = "notifications/cancelled"
LISTEN = "subscriptions/listen"
#: 2025-era session ids that ended on this node remembered (``_ended``).
ENDED_REMEMBERED = 4096
#: Seconds a DELETE waits for its session's end to be recorded before it is answered.
END_WAIT_S = 10.0
SUBSCRIPTION_ID_META = "io.modelcontextprotocol/subscriptionId"
#: The largest response written with no guard task (``_wait_first``): its head and body go
#: out in one send of the peer's stream (at most ``SEND_CHUNK`` bytes), with room for the
#: head.
QUICK_BYTES = SEND_CHUNK - 8192


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The endpoint's bounds; every time in seconds, every size in bytes."""

    #: Largest request body (the WebSocket frame bound, ``max_message_bytes``).
    max_body_bytes: int
    #: A request's head and body must arrive within this once it starts (the handshake's).
    body_timeout: float = 10.0
    #: An idle kept-alive connection is closed after this.
    keepalive_timeout: float = 15.0
    #: A session no client has reached for this long, with no exchange open, ends.
    idle_timeout: float = 3600.0
    #: A quiet SSE stream gets a comment this often.
    sse_keepalive: float = 15.0
    #: HTTP connections open at once on the node (beyond: 503 and close).
    max_connections: int = 1024
    #: HTTP sessions one client identity may hold at once (beyond: 429).
    max_sessions_per_identity: int = 256
    #: Requests one client identity may have in progress at once, streams held open (GET,
    #: ``subscriptions/listen``) and calls waited on included (beyond: 429), so that one
    #: identity cannot take every connection of the node.
    max_exchanges_per_identity: int = 128
    origins: OriginPolicy = field(default_factory=OriginPolicy)


class SessionPlace(Protocol):
    """A session's place under the node's ``max_sessions`` (``runtime.server.SessionSlot``)."""

    def take(self) -> bool: ...

    def release(self) -> None: ...


class SessionPlaces(Protocol):
    """The node's sessions, as this endpoint needs them (``runtime.server.Sessions``)."""

    max_sessions: int

    def slot(self) -> SessionPlace: ...


class NotResumable(Exception):
    """A 2025-era session id this node does not hold could not be taken over from the node
    that held it (:meth:`HttpSessionHost.serve_http` with ``resume``): ``busy`` (503, retry
    later: the node cannot look now) or not (404: no such session of this identity, or it
    ended)."""

    def __init__(self, *, busy: bool) -> None:
        super().__init__("busy" if busy else "unknown")
        self.busy = busy


class HttpSessionHost(Protocol):
    """What runs an HTTP session (the actors implement it, beside the WebSocket one)."""

    async def serve_http(
        self,
        transport: HttpSessionTransport,
        *,
        remote: str,
        idle_timeout: float,
        started: Callable[[], None],
        resume: bool = False,
    ) -> None:
        """Open the session (its row written), call ``started``, then run it until its
        transport closes, ending it after ``idle_timeout`` seconds with no request, no
        stream open and no work in flight (``HttpSessionTransport.expire_when_idle``).
        Raises :class:`~storage.errors.StorageUnavailable` before ``started`` if storage
        refuses the session; after it, raising ends only this session. ``resume``: the
        transport's id is a session another node holds or held, taken over with its
        negotiated state instead of opened; :class:`NotResumable` before ``started`` if it
        cannot be."""


class StreamableHttpEndpoint:
    """Serves Streamable HTTP connections and holds this node's HTTP sessions."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        clients: ClientTokens,
        places: SessionPlaces,
        host: HttpSessionHost,
        stream_bounds: StreamBounds,
        draining: Callable[[], bool],
    ) -> None:
        self.config = config
        self._clients = clients
        self._places = places
        self._host = host
        self._bounds = stream_bounds
        self._draining = draining
        #: Live 2025-era HTTP sessions by id.
        self.sessions: dict[str, HttpSessionTransport] = {}
        #: Live sessionless (2026-07-28) sessions, one per client identity.
        self.identities: dict[str, HttpSessionTransport] = {}
        self._starting: dict[str, trio.Event] = {}
        #: 2025-era ids being taken over from another node (``_find_or_take_over``).
        self._taking_over: dict[str, trio.Event] = {}
        #: 2025-era sessions their client ended here (DELETE), newest last (at most
        #: ``ENDED_REMEMBERED``): a later request naming one is 404 at once, never a take-over
        #: of its row (whose end may still be on its way to the database). An idle expiry is
        #: not remembered: the session may live on at another node, which this one may take
        #: it back from.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._stopping = trio.Event()
        #: Set (and replaced) whenever listen streams have something to do: the node stops,
        #: or its tools changed (:meth:`tools_changed`, counted in :attr:`_tools_generation`).
        self._wake = trio.Event()
        self._tools_generation = 0
        self._per_identity: Counter[str] = Counter()
        #: Sessions holding one of their identity's places in ``_per_identity``: given back
        #: once, when the session is ended (DELETE, a refused ``initialize``) or its task is.
        self._holding: set[str] = set()
        #: Requests in progress per identity (``max_exchanges_per_identity``).
        self._exchanges: Counter[str] = Counter()
        #: HTTP connections being served now.
        self.connections = 0
        self._throttle = LogThrottle()
        self._session_nursery: trio.Nursery | None = None

    def bind(self, sessions: trio.Nursery) -> None:
        """The nursery HTTP sessions run in (they outlast the connection that opened them);
        the server's, cancelled after its drain."""
        self._session_nursery = sessions

    # -- a connection ------------------------------------------------------------------------

    async def serve(
        self, stream: PeerStream, conn: h11.Connection, request: h11.Request, peer: Peer
    ) -> None:
        """Serve ``request`` (its head already read by ``conn``) and the requests after it on
        this connection, until either side closes it or it idles past ``keepalive_timeout``.
        Raises nothing for what the peer does."""
        wire = HttpWire(stream, conn)
        if self.connections >= self.config.max_connections:
            self._throttle.emit(
                log.warning,
                "http.refused",
                key="http.refused:max connections",
                reason="max connections",
                limit=self.config.max_connections,
            )
            await self._answer_refusal(
                wire,
                Refusal(
                    503,
                    ServerBusy("server busy: too many HTTP connections, retry later"),
                    headers=retry_after(),
                ),
                close=True,
            )
            return
        self.connections += 1
        try:
            current: h11.Request | None = request
            while current is not None:
                try:
                    await self._exchange(wire, current, peer)
                except PeerGone:
                    return
                with trio.move_on_after(self.config.keepalive_timeout):
                    current = await wire.next_request()
                    continue
                current = None  # idle past the keep-alive timeout: close quietly
        finally:
            self.connections -= 1

    async def _exchange(self, wire: HttpWire, request: h11.Request, peer: Peer) -> None:
        if asks_websocket(request):
            # The first request of a connection is upgraded before it reaches this endpoint
            # (runtime.http_dispatch), so this one came later on a kept-alive connection.
            # RFC 6455 section 4.1 opens a WebSocket on a connection of its own, and h11 has
            # already parsed (consumed) the bytes trio-websocket would need to replay:
            # refused with the answer of any head the MCP port refuses, and closed. Served
            # as a plain GET it got an answer about Accept (406) that says nothing useful.
            await self._answer_refusal(wire, _LATE_UPGRADE, close=True)
            return
        try:
            await self._route(wire, request, peer)
        except Refusal as refusal:
            await self._answer_refusal(wire, refusal)
        except h11.RemoteProtocolError as exc:
            await self._answer_refusal(
                wire,
                Refusal(exc.error_status_hint, InvalidRequest(f"bad request: {exc}")),
                close=True,
            )

    async def _answer_refusal(self, wire: HttpWire, refusal: Refusal, close: bool = False) -> None:
        if wire.conn.our_state is not h11.SEND_RESPONSE:
            wire.broken = True  # a response had begun: nothing more can be said on it
            return
        self._throttle.emit(
            log.info,
            "http.refused",
            key=f"http.refused:{refusal.kind}",
            status=refusal.status,
            reason=refusal.error.message,
        )
        await wire.respond(
            refusal.status,
            refusal.body(),
            content_type=JSON,
            headers=refusal.headers,
            close=close,
        )

    async def _route(self, wire: HttpWire, request: h11.Request, peer: Peer) -> None:
        path = request.target.partition(b"?")[0]
        if path != MCP_PATH:
            raise Refusal(404, InvalidRequest("not found: the MCP endpoint is /mcp"))
        if not self.config.origins.admits(header(request, b"origin")):
            raise Refusal(403, InvalidRequest("forbidden: this Origin may not use the server"))
        method = request.method
        if method not in (b"POST", b"GET", b"DELETE"):
            raise Refusal(
                405, InvalidRequest("method not allowed: POST, GET or DELETE"), headers=(ALLOW,)
            )
        identity = self._clients.identify(
            presented_token(request.target.decode("latin-1"), request.headers)
        )
        if identity is None:
            raise Refusal(
                401,
                InvalidRequest(
                    "unauthorized: present the token as 'Authorization: Bearer' or ?token="
                ),
                headers=((b"www-authenticate", b'Bearer realm="exai"'),),
            )
        if self._draining():
            raise Refusal(
                503,
                Unavailable(
                    "server draining: it is shutting down; connect to another node",
                    {"retryAfterMs": RETRY_AFTER_S * 1000},
                ),
                headers=retry_after(),
            )
        check_version(request)
        if self._exchanges[identity] >= self.config.max_exchanges_per_identity:
            raise Refusal(
                429,
                ServerBusy(
                    f"too many requests in progress: this client identity has "
                    f"{self.config.max_exchanges_per_identity}; retry later",
                    {"retryAfterMs": RETRY_AFTER_S * 1000},
                ),
                headers=retry_after(),
                kind="exchanges per identity",
            )
        self._exchanges[identity] += 1
        try:
            await self._dispatch(wire, request, identity, peer)
        finally:
            self._exchanges[identity] -= 1
            if not self._exchanges[identity]:
                del self._exchanges[identity]

    async def _dispatch(
        self, wire: HttpWire, request: h11.Request, identity: str, peer: Peer
    ) -> None:
        method = request.method
        if method == b"POST":
            await self._post(wire, request, identity, peer)
            return
        # A GET or DELETE has no body, but h11 ends the request only once its end has been
        # read: without this the connection could not serve the next request (it was closed
        # after every GET and DELETE, and a client reusing it in that moment got a reset).
        await self._read_body(wire, request)
        if method == b"GET":
            await self._get(wire, request, identity, peer)
        else:
            await self._delete(wire, request, identity, peer)

    # -- POST --------------------------------------------------------------------------------

    async def _post(self, wire: HttpWire, request: h11.Request, identity: str, peer: Peer) -> None:
        content_type = (header(request, b"content-type") or b"").partition(b";")[0].strip()
        if content_type.lower() != JSON:
            raise Refusal(
                415, InvalidRequest("unsupported media type: the body must be application/json")
            )
        if not _accepts(request, JSON) or not _accepts(request, sse.EVENT_STREAM):
            raise Refusal(
                406,
                InvalidRequest(
                    "not acceptable: Accept must list application/json and text/event-stream"
                ),
            )
        body = await self._read_body(wire, request)
        message = _decode(body)
        if is_modern(request, message):
            # 2026-07-28 has no sessions: an Mcp-Session-Id on such a request is ignored
            # (transport spec, "Earlier Streamable HTTP Revisions"), never a way around the
            # checks of its headers.
            await self._sessionless(wire, request, message, identity)
            return
        session_id = _session_id(request)
        if session_id is None:
            if not (isinstance(message, jsonrpc.Request) and message.method == "initialize"):
                raise Refusal(
                    400,
                    InvalidRequest(
                        "bad request: Mcp-Session-Id header required; start a session "
                        "with initialize"
                    ),
                    kind="no session id",
                )
            transport = await self._open_session(identity, peer)
        else:
            transport = await self._find_or_take_over(session_id, identity, peer)
        frame = body.decode()
        if isinstance(message, jsonrpc.Request):
            await self._answer_request(wire, transport, message, frame, opening=session_id is None)
            return
        try:
            await transport.deliver(frame)
        except ConnectionGone:
            raise _gone(transport.session_id) from None
        if (
            isinstance(message, jsonrpc.Notification)
            and message.method == "notifications/cancelled"
        ):
            cancelled = (message.params or {}).get("requestId")
            if isinstance(cancelled, str | int) and not isinstance(cancelled, bool):
                transport.cancelled(cancelled)
        await wire.respond(202, b"", content_type=None, headers=_session_headers(transport))

    async def _read_body(self, wire: HttpWire, request: h11.Request) -> bytes:
        limit = self.config.max_body_bytes
        with trio.move_on_after(self.config.body_timeout):
            try:
                return await wire.read_body(request, limit)
            except BodyTooLarge:
                raise Refusal(
                    413,
                    InvalidRequest(f"payload too large: a message may be at most {limit} bytes"),
                ) from None
        raise Refusal(
            408,
            InvalidRequest(
                f"request timeout: the body did not arrive within {self.config.body_timeout:g} s"
            ),
        )

    async def _open_session(
        self, identity: str, peer: Peer, *, resume: str | None = None
    ) -> HttpSessionTransport:
        """A 2025-era session for ``initialize`` (or, ``resume``, the one of that id another
        node holds, taken over): 429 past the identity's bound, which is taken in the same
        step as it is checked (no checkpoint between: concurrent ``initialize`` requests
        cannot all pass one free place) and given back when the session ends or fails to
        start. The places are taken before a take-over is asked of the database, so that a
        session claimed there always runs here."""
        if self._per_identity[identity] >= self.config.max_sessions_per_identity:
            raise Refusal(
                429,
                ServerBusy(
                    f"too many sessions: this client identity holds "
                    f"{self.config.max_sessions_per_identity}; end some (DELETE) or retry later",
                    {"retryAfterMs": RETRY_AFTER_S * 1000},
                ),
                headers=retry_after(),
                kind="sessions per identity",
            )
        self._per_identity[identity] += 1
        try:
            transport = await self._start_session(identity, str(peer), resume=resume)
        except BaseException:
            self._forget_identity_session(identity)
            raise
        self._holding.add(transport.session_id)
        return transport

    async def _start_session(
        self,
        identity: str,
        remote: str,
        *,
        sessionless: bool = False,
        resume: str | None = None,
    ) -> HttpSessionTransport:
        """A new session in the sessions nursery, once its row is written (or, ``resume``,
        claimed: 404 if it cannot be); 503 if the node holds ``max_sessions`` or storage
        refuses it."""
        place = self._places.slot()
        if not place.take():
            raise Refusal(
                503,
                ServerBusy(
                    "server busy: session limit reached, retry later",
                    {"retryAfterMs": RETRY_AFTER_S * 1000},
                ),
                headers=retry_after(),
                kind="max sessions",
            )
        transport = HttpSessionTransport(
            resume or str(uuid.uuid4()), identity, self._bounds, sessionless=sessionless
        )
        assert self._session_nursery is not None, "bind() the endpoint to a nursery first"
        try:
            await self._session_nursery.start(
                self._run_session, transport, place, remote, resume is not None
            )
        except NotResumable as refused:
            place.release()
            if not refused.busy:
                raise _gone(transport.session_id) from None
            raise Refusal(
                503,
                ServerBusy(
                    "server busy: cannot look the session up now, retry later",
                    {"retryAfterMs": RETRY_AFTER_S * 1000},
                ),
                headers=retry_after(),
                kind="resume lookups",
            ) from None
        except StorageUnavailable:
            place.release()
            log.warning("session.refused", session_id=transport.session_id, reason="storage")
            raise Refusal(
                503,
                Unavailable(
                    "storage unavailable; retry later", {"retryAfterMs": RETRY_AFTER_S * 1000}
                ),
                headers=retry_after(),
                kind="storage",
            ) from None
        return transport

    async def _run_session(
        self,
        transport: HttpSessionTransport,
        place: SessionPlace,
        remote: str,
        resume: bool = False,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One HTTP session from its row to its end, in the sessions nursery. Raises only
        what storage raised before the session started (see ``HttpSessionHost``)."""
        session_id, identity = transport.session_id, transport.identity
        started = False

        def report() -> None:
            nonlocal started
            started = True
            if transport.sessionless:
                self.identities[identity] = transport
            else:
                self.sessions[session_id] = transport
            task_status.started()

        try:
            await self._host.serve_http(
                transport,
                remote=remote,
                idle_timeout=self.config.idle_timeout,
                started=report,
                resume=resume,
            )
        except Exception:
            if not started:
                raise
            log.exception("session.crashed", session_id=session_id)
            transport.close_now(CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON)
        finally:
            transport.close_now(CLOSE_GOING_AWAY, "server shutting down")
            if started and transport.sessionless:
                if self.identities.get(identity) is transport:
                    del self.identities[identity]
            elif started:
                del self.sessions[session_id]
                self._give_back_place(transport)
            place.release()
            transport.gone.set()

    def _end_session(self, transport: HttpSessionTransport, code: int, reason: str) -> None:
        """End a 2025-era session now, and give its identity's place back at once: its
        end is recorded behind (``_run_session``), but a client told it ended may open
        another in the same moment."""
        transport.close_now(code, reason)
        self._give_back_place(transport)

    def _give_back_place(self, transport: HttpSessionTransport) -> None:
        if transport.session_id in self._holding:
            self._holding.discard(transport.session_id)
            self._forget_identity_session(transport.identity)

    def _forget_identity_session(self, identity: str) -> None:
        self._per_identity[identity] -= 1
        if not self._per_identity[identity]:
            del self._per_identity[identity]

    async def _find_or_take_over(
        self, session_id: str, identity: str, peer: Peer
    ) -> HttpSessionTransport:
        """The session ``session_id`` of this node, or, if it holds none by that id, the one
        another node holds or held, taken over (one database round trip, once per node;
        ``actors.session.handover``): a load balancer may send each request to any node.
        One take-over per id at a time; the others wait for it and find its result."""
        while session_id not in self.sessions:
            pending = self._taking_over.get(session_id)
            if pending is None:
                break
            await pending.wait()
        if session_id in self.sessions or session_id in self._ended:
            return self._find(session_id, identity)
        self._taking_over[session_id] = done = trio.Event()
        try:
            return await self._open_session(identity, peer, resume=session_id)
        finally:
            del self._taking_over[session_id]
            done.set()

    def _find(self, session_id: str, identity: str) -> HttpSessionTransport:
        transport = self.sessions.get(session_id)
        if transport is None or transport.identity != identity or transport.closed is not None:
            # Another identity's session is "not found" too: its existence is not theirs
            # to learn.
            raise _gone(session_id)
        return transport

    async def _answer_request(
        self,
        wire: HttpWire,
        transport: HttpSessionTransport,
        message: jsonrpc.Request,
        frame: str,
        *,
        opening: bool = False,
    ) -> None:
        """Deliver ``message`` and write its response stream. ``opening``: it is the
        ``initialize`` that opened ``transport``, which ends unless that succeeded."""
        try:
            stream = transport.open_stream(message.id, lambda: wire.stream.last_sent)
        except StreamInUse:
            raise Refusal(
                409,
                InvalidRequest(f"invalid request: id {message.id!r} is already in use"),
                request_id=message.id,
                kind="id in use",
            ) from None
        except ConnectionGone:
            raise _gone(transport.session_id) from None
        if transport.sessionless:
            # Known to the shared session by its stream's own id (see ``open_stream``).
            frame = renamed(message, stream.request_id)
        try:
            try:
                await transport.deliver(frame)
            except ConnectionGone:
                raise _gone(transport.session_id) from None
            headers = [] if transport.sessionless else _session_headers(transport)
            writer = await self._write(
                wire, transport, stream, json_allowed=True, headers=headers, opening=opening
            )
        except PeerGone:
            if transport.sessionless and not stream.answered:
                await _cancel(transport, stream)
            if opening:
                # Its client never learnt of it: nobody would end it before the idle expiry.
                self._end_session(transport, CLOSE_NORMAL, "initialize was not answered")
            raise
        finally:
            transport.release(stream)
        if writer.refused:
            self._end_session(transport, CLOSE_NORMAL, "initialize was refused")

    # -- 2026-07-28: sessionless -------------------------------------------------------------

    async def _sessionless(
        self, wire: HttpWire, request: h11.Request, message: jsonrpc.Inbound, identity: str
    ) -> None:
        """A 2026-07-28 request: no session, its version and identity in its ``_meta`` and
        mirrored in headers (checked: 400 and -32020 if they differ, 400 and -32022 for a
        version we do not speak). Served by the identity's sessionless session, started
        on demand; a notification is taken (202) and has nothing to act on (the revision
        defines no client notification over HTTP: closing a stream is how a client cancels)."""
        check_mirrored_headers(request, message)
        if not isinstance(message, jsonrpc.Request):
            await wire.respond(202, b"", content_type=None)
            return
        if message.method == LISTEN:
            await self._listen(wire, message)
            return
        if message.method == "initialize":
            # The handshake is not part of 2026-07-28: what that era says of any method it
            # lacks (404, -32601), with the way to the handshake era in the message.
            raise Refusal(
                404,
                MethodNotFound(
                    "method not found: 'initialize' is not part of 2026-07-28; send it with a "
                    f"handshake version ({', '.join(versions.HANDSHAKE_VERSIONS)}) and no "
                    "2026-07-28 MCP-Protocol-Version to start a session"
                ),
                request_id=message.id,
                kind="modern initialize",
            )
        transport = await self._identity_session(identity)
        await self._answer_request(wire, transport, message, "")

    async def _listen(self, wire: HttpWire, message: jsonrpc.Request) -> None:
        """``subscriptions/listen`` (2026-07-28, ``basic/patterns/subscriptions.mdx``): the
        stream that replaces the GET stream. Its acknowledgment names what this server will
        send of what was asked: ``toolsListChanged`` (``notifications/tools/list_changed``
        when the node's tools change: a proxied server's list, or it going down or up);
        prompts and resources it has none of, so they are left out. The stream then stays
        open with keep-alive comments until the client closes it, or the node stops, which
        ends it gracefully with the completion result. It needs no
        session: nothing is sent on it that a session would produce."""
        asked = (message.params or {}).get("notifications")
        if not isinstance(asked, dict):
            raise Refusal(
                400,
                InvalidParams("invalid params: 'notifications' must be an object"),
                request_id=message.id,
                kind="listen params",
            )
        if "taskIds" in asked and not _declares_tasks(message):
            # SEP-2663, "Task Status Notifications": MUST.
            raise Refusal(
                400,
                MissingRequiredClientCapability(
                    "missing required client capability: task status notifications belong "
                    f"to the {versions.TASKS_EXTENSION!r} extension; declare it in "
                    f"_meta[{versions.CLIENT_CAPABILITIES_META!r}].extensions",
                    {"extensions": {versions.TASKS_EXTENSION: {}}},
                ),
                request_id=message.id,
                kind="listen capability",
            )
        # Task ids asked for are not honoured (none are named back): clients poll tasks/get.
        honoured = {"toolsListChanged": True} if asked.get("toolsListChanged") is True else {}
        meta = {SUBSCRIPTION_ID_META: message.id}
        acknowledged = jsonrpc.encode_notification(
            "notifications/subscriptions/acknowledged",
            {"_meta": meta, "notifications": honoured},
        )
        await wire.start_stream(200, list(SSE_HEADERS))
        await wire.send_data(sse.event(acknowledged))
        with _peer_gone_unwrapped():
            await self._listen_until_done(wire, message, honoured, meta)
        if wire.broken:
            raise PeerGone

    async def _listen_until_done(
        self,
        wire: HttpWire,
        message: jsonrpc.Request,
        honoured: dict[str, bool],
        meta: Mapping[str, object],
    ) -> None:
        changed = jsonrpc.encode_notification("notifications/tools/list_changed", {"_meta": meta})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_after, wire.watch_peer, nursery.cancel_scope)
            seen = self._tools_generation
            while not self._stopping.is_set():
                with trio.move_on_after(self.config.sse_keepalive):
                    await self._wake.wait()
                if self._stopping.is_set():
                    break
                if honoured and self._tools_generation != seen:
                    seen = self._tools_generation
                    await wire.send_data(sse.event(changed))
                else:
                    await wire.send_data(sse.KEEPALIVE)
            done = jsonrpc.encode_result(message.id, {"resultType": "complete", "_meta": meta})
            await wire.send_data(sse.event(done))
            await wire.end_stream()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """The node is stopping: open ``subscriptions/listen`` streams end with their
        completion result."""
        self._stopping.set()
        self._wake_listeners()

    def tools_changed(self) -> None:
        """The node's tools changed (a proxied server): each listen stream that asked for
        ``toolsListChanged`` gets ``notifications/tools/list_changed``."""
        self._tools_generation += 1
        self._wake_listeners()

    def _wake_listeners(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    async def _identity_session(self, identity: str) -> HttpSessionTransport:
        """The identity's sessionless session: the running one, or a new one (one start at
        a time per identity; the others wait for it)."""
        while True:
            transport = self.identities.get(identity)
            if transport is not None and transport.closed is None:
                return transport
            starting = self._starting.get(identity)
            if starting is None:
                break
            await starting.wait()
        self._starting[identity] = done = trio.Event()
        try:
            return await self._start_session(identity, "http (sessionless)", sessionless=True)
        finally:
            del self._starting[identity]
            done.set()

    # -- GET and DELETE ----------------------------------------------------------------------

    async def _get(self, wire: HttpWire, request: h11.Request, identity: str, peer: Peer) -> None:
        if not _accepts(request, sse.EVENT_STREAM):
            raise Refusal(406, InvalidRequest("not acceptable: Accept must list text/event-stream"))
        transport = await self._find_or_take_over(
            self._required_session_id(request), identity, peer
        )
        try:
            stream = transport.open_listen(lambda: wire.stream.last_sent)
        except ConnectionGone:
            raise _gone(transport.session_id) from None
        try:
            await self._write(
                wire, transport, stream, json_allowed=False, headers=_session_headers(transport)
            )
        finally:
            transport.release(stream)

    async def _delete(
        self, wire: HttpWire, request: h11.Request, identity: str, peer: Peer
    ) -> None:
        transport = await self._find_or_take_over(
            self._required_session_id(request), identity, peer
        )
        # This node's copy may be stale (another node took the session over since): the
        # client's end is the session's, wherever it runs now (its holder's copy ends at
        # its next look at the rows, ``actors.session.handover.end_copies_ended_elsewhere``).
        transport.ended_by_client = True
        self._end_session(transport, CLOSE_NORMAL, "the client ended the session (DELETE)")
        self._ended[transport.session_id] = None
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        # Answered once its end is recorded (in the database: ``actors.session.runner``), so
        # that no node takes the session over afterwards; bounded as that record is.
        with trio.move_on_after(END_WAIT_S):
            await transport.gone.wait()
        await wire.respond(200, b"", content_type=None, headers=_session_headers(transport))

    def _required_session_id(self, request: h11.Request) -> str:
        session_id = _session_id(request)
        if session_id is None and versions.is_modern(header_text(request, VERSION_HEADER)):
            # 2026-07-28 has no GET stream and no DELETE (transport spec, "Earlier
            # Streamable HTTP Revisions"): what a server of that revision answers.
            raise Refusal(
                405,
                InvalidRequest("method not allowed: 2026-07-28 has no GET stream or DELETE"),
                headers=((b"allow", b"POST"),),
            )
        if session_id is None:
            raise Refusal(400, InvalidRequest("bad request: Mcp-Session-Id header required"))
        return session_id

    # -- writing a stream --------------------------------------------------------------------

    async def _write(
        self,
        wire: HttpWire,
        transport: HttpSessionTransport,
        stream: ResponseStream,
        *,
        json_allowed: bool,
        headers: list[tuple[bytes, bytes]],
        opening: bool = False,
    ) -> StreamWriter:
        """Write ``stream`` to the peer until its response (or, for the listen stream, until
        the session or the peer ends it); the writer, which says how it ended. Raises
        :class:`PeerGone` if the peer left or stopped reading (the connection is then
        closed).

        A POST's small response, the first and only message of its stream, is written by
        this task alone (:meth:`_wait_first`); any other stream under a guard task
        (:func:`_guard`) that cancels the writing if the peer goes away or stalls and keeps
        a quiet stream alive."""
        writer = StreamWriter(wire, stream, headers, json_allowed, opening=opening)
        if json_allowed and await self._wait_first(wire, stream):
            # The response alone, written in one send: the peer's progress is recorded per
            # send, so its stall deadline cannot move while the send lasts, and a deadline
            # does what the guard's stall check would. A peer that goes away meanwhile fails
            # the send (or, if it leaves the response unread, meets the deadline).
            with trio.move_on_at(stream.outbox.stall_deadline()) as sending:
                await stream.outbox.run(writer.write)
                await writer.finish()
            if sending.cancelled_caught:
                stream.outbox.stalled.set()
        else:
            with _peer_gone_unwrapped():
                await self._write_guarded(wire, stream, writer, json_allowed=json_allowed)
        if stream.outbox.stalled.is_set():
            self._throttle.emit(
                log.warning,
                "session.peer_not_reading",
                session_id=transport.session_id,
                transport="http",
                stall_timeout=stream.outbox.stall_timeout,
            )
        if not writer.done:
            wire.broken = True
            raise PeerGone
        return writer

    async def _write_guarded(
        self, wire: HttpWire, stream: ResponseStream, writer: StreamWriter, *, json_allowed: bool
    ) -> None:
        async with trio.open_nursery() as nursery:
            # One guard task, not one per thing to watch: every task spawned and
            # cancelled here is paid per request.
            nursery.start_soon(
                _guard, wire, stream, self.config.sse_keepalive, nursery.cancel_scope
            )
            if not json_allowed:
                await writer.begin_stream()
            await stream.outbox.run(writer.write)
            await writer.finish()
            nursery.cancel_scope.cancel()

    async def _wait_first(self, wire: HttpWire, stream: ResponseStream) -> bool:
        """Wait in the writer's own task, watching the peer, until a POST's response stream
        has its first message: ``True`` if that is its response, alone and small enough to
        be written in one send (the common case: most responses are ready within a
        millisecond, and a guard task would be spawned and cancelled for each); ``False`` if
        the stream must be written under the guard (:func:`_guard`): a notification came
        first, a keep-alive fell due (queued, as the guard queues it: the stream becomes
        SSE), the response is large, or the stream ended without one.

        Raises :class:`PeerGone` if the peer went away first: the connection is then
        closed, and the caller cancels the request as a guarded write's would. Cancelling
        this leaves nothing behind (the peer's bytes read meanwhile are kept in ``wire``)."""
        outbox = stream.outbox
        if not len(outbox) and not outbox.closed:
            # Cancelled by the outbox when a message is queued or the stream ends, by its
            # deadline when a keep-alive falls due.
            waiting = trio.CancelScope(deadline=trio.current_time() + self.config.sse_keepalive)
            with waiting:
                outbox.watcher = waiting
                try:
                    await wire.watch_peer()
                finally:
                    outbox.watcher = None
                wire.broken = True
                raise PeerGone
            if not len(outbox) and not outbox.closed:
                outbox.put_nowait(KEEPALIVE_MARK)
                return False
        first = outbox.first()
        if first is None or len(outbox) != 1:
            return False
        size = message_size(first)
        if stream.client_id is not None:
            # Renamed back to the client's id on its way out: at most six bytes a character
            # in JSON (``\u0000``), and its quotes.
            size += 6 * len(str(stream.client_id)) + 2
        return size <= QUICK_BYTES and jsonrpc.is_response(first)


async def _guard(
    wire: HttpWire, stream: ResponseStream, keepalive: float, writing: trio.CancelScope
) -> None:
    """Watch one response stream while ``writing`` (the scope of its writer) writes it, and
    cancel that scope when the writing must stop:

    * the peer went away (end of stream or reset: :meth:`HttpWire.watch_peer`, which keeps
      what it sends meanwhile for the next request);
    * the stream stalled: its peer has taken nothing for ``stall_timeout`` seconds while
      something waits to be written to it (:attr:`Outbox.stalled <runtime.outbox.Outbox>`,
      set here or by a sender waiting for room). The outgoing queue finds that out only for
      those who wait to add to it, and a single response being written (an unread JSON body)
      has no one waiting. Its writer then gives up, the connection is closed and its bytes
      are given back.

    And, every ``keepalive`` seconds, a comment on the stream when nothing is queued (a peer
    that does not read gets no pile of them).

    One task for all three: it waits for the peer under a deadline, the earlier of the next
    keep-alive and the next stall check. The stall check runs no later than
    ``stall_timeout`` seconds after the last one, so it comes no later than a stall can:
    the stall deadline is ``stall_timeout`` after the queue's last progress, which is never
    before the previous check while the queue was empty (then the deadline is infinite).
    Cancelling this task (its writer is done) is safe at any point: the peer's bytes read
    meanwhile are in ``wire``'s h11 connection, and a keep-alive is queued synchronously."""
    outbox = stream.outbox
    stall_timeout = outbox.stall_timeout
    next_keepalive = trio.current_time() + keepalive
    while True:
        stall_at = outbox.stall_deadline()
        now = trio.current_time()
        if outbox.stalled.is_set() or now >= stall_at:
            outbox.stalled.set()
            writing.cancel()
            return
        if now >= next_keepalive:
            next_keepalive = now + keepalive
            if not len(outbox) and not stream.ended.is_set():
                with contextlib.suppress(ConnectionGone):
                    outbox.put_nowait(KEEPALIVE_MARK)
                    # Queued: the next stall check counts from now, as the queue's does.
                    stall_at = outbox.stall_deadline()
        with trio.move_on_at(min(next_keepalive, stall_at, now + stall_timeout)):
            await wire.watch_peer()
            writing.cancel()  # the peer went away
            return


@contextlib.contextmanager
def _peer_gone_unwrapped() -> Iterator[None]:
    """Around a nursery whose tasks write to the peer: a :class:`PeerGone` raised in it (a
    write that found the socket reset before a watch did) comes out of trio's nursery in an
    exception group (strict exception groups), which no ``except PeerGone`` matches, so a
    2026-07-28 request was left uncancelled, an unanswered ``initialize`` never ended, and
    the peer's reset logged as the server's failure. Raised here as itself, when nothing but
    ``PeerGone`` and cancellation is in the group (cancellation is level-triggered in trio:
    the caller's next checkpoint raises it again); anything else keeps its group."""
    try:
        yield
    except BaseExceptionGroup as group:
        gone, rest = group.split(PeerGone)
        if gone is None or (rest is not None and rest.split(trio.Cancelled)[1] is not None):
            raise
        raise PeerGone from None


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


#: A WebSocket upgrade as a later request of a kept-alive connection (``_exchange``).
_LATE_UPGRADE = Refusal(
    400,
    InvalidRequest(
        "bad request: a WebSocket upgrade must be the first request of its connection "
        "(RFC 6455 section 4.1); open a new connection for it"
    ),
    kind="late websocket upgrade",
)


def _decode(body: bytes) -> jsonrpc.Inbound:
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise Refusal(400, ParseError(f"parse error: {exc}"), kind="parse error") from None
    if isinstance(data, list):
        raise Refusal(
            400,
            InvalidRequest(
                "invalid request: send one JSON-RPC message per POST (batches were removed "
                "in 2025-06-18)"
            ),
            kind="batch",
        )
    try:
        return jsonrpc.classify(data)
    except jsonrpc.InvalidRequestWithId as exc:
        raise Refusal(400, exc, request_id=exc.request_id, kind="invalid request") from None
    except RpcError as exc:
        raise Refusal(400, exc, kind="invalid request") from None


async def _cancel(transport: HttpSessionTransport, stream: ResponseStream) -> None:
    """2026-07-28: the client closed a request's response stream, which "MUST be treated by
    the server as cancellation of that request" (transport spec, "Cancellation"): the
    session is told as a ``notifications/cancelled`` would tell it. Shielded, bounded."""
    note = {
        "jsonrpc": "2.0",
        "method": CANCELLED,
        "params": {"requestId": stream.request_id, "reason": "the client closed the stream"},
    }
    with trio.CancelScope(shield=True), trio.move_on_after(5), contextlib.suppress(ConnectionGone):
        await transport.deliver(pydantic_core.to_json(note).decode())


def _session_id(request: h11.Request) -> str | None:
    value = header(request, SESSION_HEADER)
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    return text or None


def _session_headers(transport: HttpSessionTransport) -> list[tuple[bytes, bytes]]:
    return [(SESSION_HEADER, transport.session_id.encode())]


def _gone(session_id: str) -> Refusal:
    return Refusal(
        404,
        InvalidRequest(
            f"session not found: {session_id[:64]!r} is unknown, ended or expired; start a new "
            "session with initialize"
        ),
        kind="unknown session",
    )


def _accepts(request: h11.Request, media_type: bytes) -> bool:
    """Whether ``Accept`` admits ``media_type`` (RFC 9110 section 12.5.1): the most specific
    media range that matches it (itself, then ``type/*``, then ``*/*``; among equals, the
    highest weight) has a weight above 0, since ``q=0`` means "not acceptable". So
    ``application/json;q=0, */*`` does not admit JSON, and ``text/*;q=0, text/event-stream``
    admits SSE. A weight that is not a qvalue counts as 1, as if absent (tolerant: a client's
    typo must not turn into a 406). Media type parameters other than ``q`` are ignored."""
    value = header(request, b"accept")
    if value is None:
        return False
    kind = media_type.partition(b"/")[0]
    specificity = {media_type: 0, kind + b"/*": 1, b"*/*": 2}
    best: tuple[int, float] | None = None  # (specificity, weight) of the range that counts
    for item in value.split(b","):
        candidate, _, parameters = item.partition(b";")
        rank = specificity.get(candidate.strip().lower())
        if rank is None:
            continue
        weight = _weight(parameters)
        if best is None or rank < best[0] or (rank == best[0] and weight > best[1]):
            best = (rank, weight)
    return best is not None and best[1] > 0


#: A qvalue (RFC 9110 section 12.4.2): 0 to 1, at most three decimals.
_QVALUE = re.compile(rb"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _weight(parameters: bytes) -> float:
    """The ``q`` of a media range's ``;``-separated parameters: 1 if absent or malformed."""
    for parameter in parameters.split(b";"):
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"q":
            value = value.strip()
            return float(value) if _QVALUE.fullmatch(value) else 1.0
    return 1.0


def _declares_tasks(message: jsonrpc.Request) -> bool:
    """Whether the request's ``_meta`` client capabilities declare the Tasks extension."""
    meta = (message.params or {}).get("_meta")
    declared = meta.get(versions.CLIENT_CAPABILITIES_META) if isinstance(meta, dict) else None
    return versions.declares_extension(declared, versions.TASKS_EXTENSION)
