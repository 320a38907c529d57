"""A session's :class:`~runtime.connection.Connection` over Streamable HTTP (2025-era
``Mcp-Session-Id`` sessions): many short HTTP exchanges instead of one socket.

MCP's Streamable HTTP transport (modelcontextprotocol/modelcontextprotocol,
``docs/specification/2025-11-25/basic/transports.mdx``) carries each client message in its
own POST. A request's response, and the notifications that relate to it, go back on *that*
POST's response (one JSON body, or an SSE stream); messages related to no request go on the
GET stream the client may hold open; the server "MUST NOT broadcast the same message across
multiple streams". So this transport keeps:

* an inbound rendezvous: a POST handler hands its message to the session's reader
  (:meth:`deliver`) and the reader takes it (:meth:`receive`), one at a time, so a 202 for a
  notification means the session has it;
* one :class:`ResponseStream` per request in flight, keyed by its JSON-RPC id, each a bounded
  :class:`~runtime.outbox.Outbox` (the session's byte bound, counted in the node's outgoing
  budget, its stall watch) that the POST's handler writes out (``runtime.streamable_http.
  endpoint``); the session's ``send`` routes each message by its ``related_request_id``;
* the listen stream (the GET), at most one, for messages related to no request.

A message whose stream has gone (the client closed that POST's connection, or never opened a
GET stream) is dropped and counted (:attr:`HttpSessionTransport.dropped`): without
resumption (no event ids; optional in 2025-11-25, removed in 2026-07-28) there is nowhere to
deliver it. The work itself is not lost: a disconnect is not a cancellation (spec: it "SHOULD
NOT be interpreted as the client cancelling its request"), the call runs to its end and its
task row records the result; a client that must survive disconnects runs the call as a task.

Only the whole session going away raises :class:`~runtime.connection.ConnectionGone`
(DELETE, idle expiry, the drain, a crash): one stream closing is a peer's ordinary doing.

Runs in the trio thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio

from runtime.budget import ByteBudget, NodeBudget
from runtime.connection import ConnectionGone, RequestId
from runtime.mcp import jsonrpc
from runtime.outbox import Outbox, OutboxClosed

__all__ = ["HttpSessionTransport", "ResponseStream", "StreamBounds", "StreamInUse"]

log = structlog.get_logger("session")


class StreamInUse(Exception):
    """A request id already has a response stream in this session (a request with that id
    is in flight)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamBounds:
    """What one response stream may hold: the session's outgoing bounds (``SessionBounds``
    of the node) and the node's outgoing budget they count against."""

    max_bytes: int
    max_messages: int
    stall_timeout: float
    node: NodeBudget | None


class ResponseStream:
    """What the session sends for one request (or, for the listen stream, for none), queued
    until the exchange that owns the stream writes it to its peer.

    ``request_id`` is ``None`` for the listen stream. :attr:`answered` is set once the
    request's response is queued (the stream then takes nothing more); :attr:`ended` is set
    when the stream is over for any reason (answered and written, the client cancelled the
    request, the session ended, the peer went away), with :attr:`ending` saying why if the
    response will never come.
    """

    __slots__ = (
        "_lost",
        "answered",
        "client_id",
        "ended",
        "ending",
        "outbox",
        "request_id",
        "written",
    )

    def __init__(
        self,
        request_id: RequestId | None,
        bounds: StreamBounds,
        peer_took: Callable[[], float] | None,
        client_id: RequestId | None = None,
    ) -> None:
        self.request_id = request_id
        #: The id the client gave the request, when the session knows it by another one
        #: (sessionless requests: see :meth:`HttpSessionTransport.open_stream`).
        self.client_id = client_id
        self.outbox = Outbox(
            ByteBudget(bounds.max_bytes, bounds.node),
            max_messages=bounds.max_messages,
            stall_timeout=bounds.stall_timeout,
            peer_took=peer_took,
        )
        self.answered = False
        self.ended = trio.Event()
        #: Why the stream ended without its response: ``"cancelled"`` (the client cancelled
        #: the request) or the session's end (its reason); ``None`` while open or answered.
        self.ending: str | None = None
        #: Its response was written to the peer (:meth:`delivered`).
        self.written = False
        #: Called if the stream ends without its response written (``watch_delivery``).
        self._lost: Callable[[], None] | None = None

    @property
    def wire_id(self) -> RequestId | None:
        """The request's id as its client knows it."""
        return self.client_id if self.client_id is not None else self.request_id

    def end(self, why: str | None = None) -> None:
        """The stream is over: nothing more is queued, what is queued is dropped (its bytes
        given back), and its writer stops; a response not written by then is reported lost
        (:meth:`watch`). Idempotent: the first reason stands."""
        if self.ended.is_set():
            return
        if not self.answered:
            self.ending = why
        self.outbox.close()
        self.ended.set()
        lost, self._lost = self._lost, None
        if lost is not None and not self.written:
            lost()

    def delivered(self) -> None:
        """Its response was written to the peer (handed to the socket whole): the stream is
        over, and its response is not lost."""
        self.written = True
        self.end()

    def watch(self, lost: Callable[[], None]) -> None:
        """Call ``lost`` when the stream ends without its response written (queued and
        dropped, or never queued); at once if it has already ended so."""
        if self.ended.is_set():
            if not self.written:
                lost()
            return
        self._lost = lost


class HttpSessionTransport:
    """One HTTP session's side of its peer (see the module doc). A
    :class:`~runtime.connection.Connection`; :meth:`receive` is its
    :data:`~runtime.connection.Receive`."""

    def __init__(
        self, session_id: str, identity: str, bounds: StreamBounds, *, sessionless: bool = False
    ) -> None:
        self.session_id = session_id
        self.identity = identity
        #: Serves the sessionless 2026-07-28 requests of one client identity, from any number
        #: of its clients (``runtime.streamable_http.endpoint``): their ids are renamed.
        self.sessionless = sessionless
        self._next_id = 0
        self._bounds = bounds
        self._in_send, self._in_receive = trio.open_memory_channel[str](0)
        self._streams: dict[RequestId, ResponseStream] = {}
        #: Every stream whose exchange has not released it yet (answered ones included):
        #: what status and the drain count as not yet written.
        self._open: set[ResponseStream] = set()
        self.listen: ResponseStream | None = None
        #: ``(code, reason)`` of the session's end once :meth:`close` was called.
        self.closed: tuple[int, str] | None = None
        #: Its client ended it (DELETE): its end applies to the session's row whichever node
        #: holds it now, not only at this copy's epoch (``storage.rows.SessionClose``).
        self.ended_by_client = False
        #: Set when the session is over and no exchange can reach it any more.
        self.gone = trio.Event()
        #: Messages dropped because their stream had gone (see the module doc).
        self.dropped = 0
        #: trio's clock when a client last reached the session; with no stream open, the
        #: idle expiry counts from here.
        self.last_active = trio.current_time()

    # -- what the exchanges do ---------------------------------------------------------------

    def open_stream(
        self, request_id: RequestId, peer_took: Callable[[], float] | None = None
    ) -> ResponseStream:
        """The response stream of a request about to be delivered. Raises
        :class:`StreamInUse` if a request with that id is in flight, :class:`ConnectionGone`
        if the session is over.

        On a sessionless transport the request is known to the session by a new id of its
        own (:attr:`ResponseStream.request_id`, an int unique in this transport; the client's
        is :attr:`ResponseStream.client_id`): several clients of one identity share the
        session, and their ids are theirs alone. The caller renames the request before
        delivering it, and its response back before writing it.
        """
        if self.closed is not None:
            raise ConnectionGone
        client_id: RequestId | None = None
        if self.sessionless:
            self._next_id += 1
            request_id, client_id = self._next_id, request_id
        elif request_id in self._streams:
            raise StreamInUse(request_id)
        stream = ResponseStream(request_id, self._bounds, peer_took, client_id)
        self._streams[request_id] = stream
        self._open.add(stream)
        self._touch()
        return stream

    def open_listen(self, peer_took: Callable[[], float] | None = None) -> ResponseStream:
        """The listen stream (GET). A new one replaces the one open, which ends (MCP allows
        several, but each message goes to one only; one is all this server needs, and the
        newest is the one its client is surely reading: a client whose connection vanished
        without a close cannot lock its session out of the GET stream). Raises
        :class:`ConnectionGone` if the session is over."""
        if self.closed is not None:
            raise ConnectionGone
        if self.listen is not None:
            self.listen.end("replaced by a new GET stream")
        self.listen = ResponseStream(None, self._bounds, peer_took)
        self._open.add(self.listen)
        self._touch()
        return self.listen

    def release(self, stream: ResponseStream) -> None:
        """The exchange that owned ``stream`` is over (written, or its peer gone): end it and
        forget it, so its id may be used again."""
        stream.end("the client's connection closed")
        self._open.discard(stream)
        if stream.request_id is not None:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
        elif self.listen is stream:
            self.listen = None
        self._touch()

    async def deliver(self, frame: str) -> None:
        """Hand one client message (a request whose stream is open, a notification or a
        response) to the session's reader; returns once the reader has taken it. Raises
        :class:`ConnectionGone` if the session ends first."""
        self._touch()
        try:
            await self._in_send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionGone from None

    def watch_delivery(self, related_request_id: RequestId, lost: Callable[[], None]) -> None:
        """Call ``lost`` if the response to ``related_request_id`` is never written to its
        client: its stream ends first (the client closed the POST's connection, cancelled
        the request, or the session ended), with the response queued or not yet sent; at
        once if that stream is already over (see ``Connection.watch_delivery``)."""
        stream = self._streams.get(related_request_id)
        if stream is None:
            lost()  # released already: its exchange is over, nothing will be written
            return
        stream.watch(lost)

    def cancelled(self, request_id: RequestId) -> None:
        """The client cancelled ``request_id`` (``notifications/cancelled``, delivered): its
        stream ends without a response (MCP cancellation: the receiver SHOULD NOT send one
        for a cancelled request)."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.answered:
            stream.end("cancelled")

    # -- the session's side: Connection and Receive ------------------------------------------

    async def receive(self) -> str:
        """The next client message. Raises :class:`ConnectionGone` once the session is
        closing."""
        try:
            return await self._in_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionGone from None

    async def send(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Queue ``message`` on its stream, waiting while that stream is full; dropped if the
        stream has gone. Raises :class:`ConnectionGone` once the session is closing."""
        stream = self._route(message, related_request_id)
        if stream is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        try:
            await stream.outbox.put(message)
        except OutboxClosed:
            self._lost(message, related_request_id)
            return
        if related_request_id is not None and jsonrpc.is_response(message):
            self._answered(stream)

    def send_nowait(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Queue a control message now, past the stream's bound (see ``Outbox.put_nowait``)."""
        stream = self._route(message, related_request_id)
        if stream is None:
            return
        try:
            stream.outbox.put_nowait(message)
        except OutboxClosed:
            self._lost(message, related_request_id)
            return
        if related_request_id is not None and jsonrpc.is_response(message):
            self._answered(stream)

    async def wait_writable(self) -> None:
        """Never blocks while the session is open: each request has its own stream, and a
        peer that does not read one holds back only the work that writes to it (its call
        keeps its slots). Raises :class:`ConnectionGone` once closing."""
        if self.closed is not None:
            raise ConnectionGone
        await trio.lowlevel.checkpoint_if_cancelled()

    async def close(self, code: int, reason: str) -> None:
        """End the session's side: the reader's next :meth:`receive` raises
        :class:`ConnectionGone`, every open stream ends (an unanswered request's exchange
        tells its client the session ended), later exchanges find no session. Idempotent:
        the first ``code`` and ``reason`` stand (RFC 6455 close codes, as every transport
        reports them in ``session.closed``)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.close_now(code, reason)

    def close_now(self, code: int, reason: str) -> None:
        """:meth:`close`, synchronously (cannot raise)."""
        if self.closed is not None:
            return
        self.closed = (code, reason)
        self._in_send.close()
        self._in_receive.close()
        why = f"the session ended: {reason}"
        for stream in list(self._open):
            stream.end(why)
        self._touch()

    # -- what status and the drain read ------------------------------------------------------

    def __len__(self) -> int:
        """Messages queued on every stream and not yet written."""
        return sum(len(stream.outbox) for stream in self._open)

    @property
    def queued_bytes(self) -> int:
        return sum(stream.outbox.queued_bytes for stream in self._open)

    @property
    def streams(self) -> int:
        """Exchanges open on the session: requests in flight or being answered, and the
        listen stream."""
        return len(self._open)

    # -- idle expiry -------------------------------------------------------------------------

    async def expire_when_idle(self, idle_timeout: float, busy: Callable[[], bool]) -> None:
        """Close the session (1000, ``idle``) once no client has reached it for
        ``idle_timeout`` seconds, with no exchange open and nothing ``busy`` (work accepted
        and not yet done: a call whose client went away runs to its end first): a client
        that never sends DELETE cannot hold a place under ``max_sessions`` for ever. Run it
        beside the session, in its nursery: it returns once it has closed the session, and
        is cancelled by its owner when the session ends otherwise (it sleeps until its next
        look, which a closing session does not wake).

        The deadline is looked at lazily, when it falls due: activity only moves
        :attr:`last_active` (every request would otherwise wake this task and re-arm its
        timer), and the look finding it moved sleeps again until the new deadline. An open
        exchange puts the look off by ``idle_timeout`` (its release is activity, so the
        deadline cannot be earlier than that). Work in flight signals nothing here, so while
        it lasts past the deadline it is looked at again every ``min(idle_timeout, 1)``
        seconds."""
        while self.closed is None:
            now = trio.current_time()
            if self.streams:
                deadline = now + idle_timeout
            else:
                deadline = self.last_active + idle_timeout
                if now >= deadline:
                    if not busy():
                        self.close_now(1000, f"idle for {idle_timeout:g} s")
                        return
                    deadline = now + min(idle_timeout, 1.0)
            await trio.sleep_until(deadline)

    # -- internals ---------------------------------------------------------------------------

    def _route(self, message: str, related_request_id: RequestId | None) -> ResponseStream | None:
        if self.closed is not None:
            raise ConnectionGone
        if related_request_id is None:
            stream = self.listen
        else:
            stream = self._streams.get(related_request_id)
        if stream is None or stream.ended.is_set() or stream.answered:
            self._lost(message, related_request_id)
            return None
        return stream

    def _answered(self, stream: ResponseStream) -> None:
        """The request's response is queued: its id is free again at once, as the session's
        own bookkeeping frees it (before the response can reach the client, so a client
        that reuses an id as soon as it has its answer never finds it in use)."""
        stream.answered = True
        request_id = stream.request_id
        if request_id is not None and self._streams.get(request_id) is stream:
            del self._streams[request_id]

    def _lost(self, message: str, related_request_id: RequestId | None) -> None:
        if self.closed is not None:
            raise ConnectionGone
        self.dropped += 1
        if self.dropped == 1:  # once per session: a peer's doing, not worth a line each
            log.info(
                "session.http_message_dropped",
                session_id=self.session_id,
                request_id=related_request_id,
                reason="its stream has gone (no resumption)",
            )

    def _touch(self) -> None:
        self.last_active = trio.current_time()
