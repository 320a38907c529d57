"""How a session talks to its peer, whatever carries the bytes: the :class:`Connection`.

The session core (its reader, actor, call runner, progress and client logging) knows its peer
only through this interface, and its peer's frames only through a :data:`Receive` function,
so a new transport needs no change inside the session. Implementations:

* :class:`runtime.websocket_transport.WebSocketTransport`: one WebSocket (``/mcp``); output
  goes through the session's bounded outgoing queue (:class:`runtime.outbox.Outbox`), whose
  stall detection (1008), byte budgets and writer task stay on the transport's side;
* :class:`runtime.memory_transport.MemoryTransport`: in memory, with a
  :class:`~runtime.memory_transport.MemoryClient` as the peer (tests, embedding);
* Streamable HTTP (issue #15) next: one POST per request, whose response stream carries that
  request's response and the notifications that relate to it.

``related_request_id`` is what makes the last one possible. MCP's Streamable HTTP transport
(modelcontextprotocol/modelcontextprotocol, ``docs/specification/2025-11-25/basic/
transports.mdx``, "Sending Messages to the Server" and "Listening for Messages from the
Server") sends a request's response, and the notifications that relate to it (its
``notifications/progress``, the ``notifications/message`` its tool logs), on the stream of
the POST that carried the request, and messages that relate to no request on the GET stream.
So every message the session sends names the request it belongs to, or ``None`` (a parse
error with ``id: null``, a batch refused as a whole). WebSocket has one stream and ignores it.
(The official Python SDK's ``ServerSession.send_notification`` takes the same
``related_request_id``.)

Runs in the trio thread only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INTERNAL_ERROR_REASON",
    "CLOSE_NORMAL",
    "Connection",
    "ConnectionGone",
    "Receive",
    "RequestId",
    "message_size",
]

#: RFC 6455 section 7.4.1 "normal closure": the client ended its session (a WebSocket close
#: 1000, an HTTP DELETE, an idle expiry); every transport reports its end with these codes.
CLOSE_NORMAL = 1000
#: RFC 6455 section 7.4.1 "going away": the node is stopping.
CLOSE_GOING_AWAY = 1001
#: RFC 6455 section 7.4.1 "internal error": a session that failed (its actor gave up) is
#: closed with it, on every transport.
CLOSE_INTERNAL_ERROR = 1011
#: Its reason, on the wire and in ``session.closed``.
CLOSE_INTERNAL_ERROR_REASON = "internal error; see server log"

#: A JSON-RPC request id (JSON-RPC 2.0: a string or a number; never ``null`` for a request).
RequestId = str | int

#: The peer's next frame: text (one JSON-RPC message or batch) or bytes (refused, 1003).
#: Raises the transport's own error when the peer has gone (the transport that started the
#: session handles it: WebSocket parks the session on an abnormal close), or
#: :class:`ConnectionGone` for a plain end with nothing to handle.
Receive = Callable[[], Awaitable[str | bytes]]


class ConnectionGone(Exception):
    """The connection is going away: nothing more can be sent to the peer.

    Raised by :meth:`Connection.send`, :meth:`Connection.send_nowait` and
    :meth:`Connection.wait_writable` once the connection is closing (the session ended it, or
    the transport found its peer gone); the session stops sending then, it is not a crash.
    """


class Connection(Protocol):
    """The session's side of its peer. Implementations document their bounds.

    Messages are encoded JSON-RPC (one message, or one batch) and are delivered in the order
    they were sent.
    """

    async def send(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Send ``message``, waiting while the peer is not taking output (back-pressure: a
        call holds its slots until its reply is accepted here). ``related_request_id``: the
        request it answers or belongs to, ``None`` if none (see the module doc).

        Raises :class:`ConnectionGone`. Cancelling it sends nothing.
        """
        ...

    def send_nowait(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Send a control message now, past any bound (answers the reader gives at once,
        -32001 after a crash); the transport bounds how far this can overshoot.

        Raises :class:`ConnectionGone`.
        """
        ...

    async def wait_writable(self) -> None:
        """Wait until the peer takes output again; the reader waits here before each frame,
        so a peer that does not read stops being read (TCP back-pressure on WebSocket).

        Raises :class:`ConnectionGone`.
        """
        ...

    def watch_delivery(self, related_request_id: RequestId, lost: Callable[[], None]) -> None:
        """Call ``lost`` (once, in the trio thread, synchronously) if the response to
        ``related_request_id``, sent with :meth:`send` after this call, is never written to
        the peer because that request's own stream ended first; at once if it has already
        ended. On Streamable HTTP each request has its stream, which its client may close
        (or its session end) while the session goes on: a response accepted by :meth:`send`
        may then be queued and never written. A transport with one stream for the whole
        session (WebSocket, memory) never calls it: losing what it queued is losing the
        connection, which the session's own end handles. Must not raise."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """End the connection from the session's side: nothing more is sent (later sends
        raise :class:`ConnectionGone`), and the peer is told ``code`` (RFC 6455 section
        7.4.1 codes: 1003 a binary frame, 1009 a frame too big) and ``reason``. Idempotent:
        the first close's code stands. Bounded in time by the transport; never raises for a
        peer that is already gone.
        """
        ...


def message_size(message: str) -> int:
    """Bytes of ``message`` in UTF-8, without encoding it when it is ASCII (the usual JSON
    case: ``str.isascii`` is O(1) on CPython's compact ASCII strings)."""
    return len(message) if message.isascii() else len(message.encode())
