"""The first request on a connection to the MCP port, read with h11 and dispatched.

One port serves both the MCP WebSocket and the plain-HTTP endpoints that load balancers and
orchestrators need, so the request head is read here first (h11, bounded by its
``max_incomplete_event_size``, the same 16 KiB bound wsproto applies to a handshake) and then:

* a WebSocket upgrade (``Upgrade: websocket``, RFC 6455 section 4.1) goes on to
  trio-websocket over a :class:`ReplayStream`, which hands it the bytes already read before
  any new ones, so the handshake is parsed and checked exactly as if nothing had been read.
  Only the first request of a connection is upgraded: the same request later on a kept-alive
  Streamable HTTP connection is refused (400) by that endpoint;
* ``GET /healthz`` (the process is alive) and ``GET /readyz`` (it should be sent traffic: its
  database is reachable and it is not draining) are answered with one status word, no token
  needed, then the connection is closed. They tell nothing a client could not learn by
  trying, and the admin interface (loopback only, with a token) tells the rest;
* a plain request for ``/mcp`` is MCP's Streamable HTTP: ``runtime.server`` hands it, with
  the connection, to :mod:`runtime.streamable_http.endpoint`;
* any other path gets 404;
* a head h11 cannot parse (garbage, a bad request line or header, a head over the bound) gets
  h11's own verdict as its status (400, or 431 for a head over the bound) with a JSON-RPC
  error body (-32600, ``id: null``), as every refusal of the MCP endpoint
  (:func:`refuse_head`; the Streamable HTTP wire answers a bad head of a later request on
  its kept-alive connection the same way). A client of the MCP port is an MCP client: its
  SDK reads a JSON-RPC error, not a line of text. Logged at most once per period
  (``http.refused``, ``kind`` ``bad request head``).

Every answer given here closes the connection (``Connection: close``): a probe costs one
request, and nothing can hold a connection open past its first answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import structlog
import trio

from runtime.http1 import TEXT_PLAIN, Response, send_response
from runtime.log_throttle import LogThrottle
from runtime.streamable_http.refusal import bad_head

log = structlog.get_logger("http")

#: ``Content-Type`` of a JSON-RPC error body.
JSON = b"application/json"
#: Refused heads, logged at most once per period whichever connection sent them: a peer can
#: send them at will (``runtime.log_throttle``).
_refused_heads = LogThrottle()

HEALTHZ = b"/healthz"
READYZ = b"/readyz"
#: Bytes asked of the socket per read while the head is incomplete (trio's default size).
RECEIVE_BYTES = 65536

Readiness = Callable[[], Awaitable[str | None]]
"""Whether the node should be sent traffic: ``None`` if so, else the reason it should not,
as the word ``/readyz`` answers (``"draining"``, ``"database unavailable"``)."""


class ReplayStream(trio.abc.Stream):
    """``stream``, with ``prefix`` (bytes already read from it) received again first."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()  # a receive is a checkpoint, even from the buffer
        if max_bytes is None or max_bytes >= len(self._prefix):
            data, self._prefix = self._prefix, b""
        else:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A complete request head, the h11 connection to answer it on, and every byte read from
    the connection so far (the head, and whatever arrived with it)."""

    conn: h11.Connection
    request: h11.Request
    received: bytes

    @property
    def path(self) -> bytes:
        return self.request.target.partition(b"?")[0]

    @property
    def websocket(self) -> bool:
        """Asks for a WebSocket (RFC 6455 section 4.1); trio-websocket checks the rest."""
        return asks_websocket(self.request)

    def replay(self, stream: trio.abc.Stream) -> ReplayStream:
        """``stream`` as it was before the head was read from it."""
        return ReplayStream(self.received, stream)


def asks_websocket(request: h11.Request) -> bool:
    """Whether ``request`` asks for a WebSocket (``Upgrade: websocket``, RFC 6455 section
    4.1)."""
    for name, value in request.headers:
        if name == b"upgrade":
            return any(token.strip().lower() == b"websocket" for token in value.split(b","))
    return False


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A head h11 refused; ``status`` is its hint (400, or 431 past the size bound),
    ``reason`` its description."""

    conn: h11.Connection
    status: int
    reason: str


async def read_request_head(stream: trio.abc.Stream) -> RequestHead | BadRequest | None:
    """Read until a request head is complete; ``None`` if the peer ends the stream first.

    Bounded in size by h11 (``max_incomplete_event_size``, 16 KiB), not in time: the caller
    holds the handshake deadline.
    """
    conn = h11.Connection(h11.SERVER)
    received = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return BadRequest(conn, exc.error_status_hint, str(exc))
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(RECEIVE_BYTES))
            received += data
            conn.receive_data(data)  # b"": the peer's end of stream, seen as ConnectionClosed
            continue
        if isinstance(event, h11.Request):
            return RequestHead(conn, event, bytes(received))
        return None  # ConnectionClosed: the peer left before a whole head


async def answer_plain(stream: trio.abc.Stream, head: RequestHead, readiness: Readiness) -> None:
    """Answer a request that is neither a WebSocket upgrade nor for ``/mcp`` (see the module
    doc); the caller closes the connection afterwards."""
    await send_response(head.conn, stream, await _route(head, readiness))


async def refuse_head(stream: trio.abc.Stream, bad: BadRequest) -> None:
    """Answer a head h11 refused: its status, a JSON-RPC error body, ``Connection: close``;
    logged at most once per period. A peer already gone is not told (nothing raised); the
    caller closes the connection afterwards."""
    refusal = bad_head(bad.status, bad.reason)
    _refused_heads.emit(
        log.info,
        "http.refused",
        key=f"http.refused:{refusal.kind}",
        status=refusal.status,
        reason=refusal.error.message,
    )
    # h11 lets a server answer even a head it refused (its side is still IDLE).
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send_response(
            bad.conn, stream, _closing(refusal.status, refusal.body(), content_type=JSON)
        )


async def _route(head: RequestHead, readiness: Readiness) -> Response:
    path = head.path
    if path not in (HEALTHZ, READYZ):
        return _closing(404, b"not found: the MCP endpoint is /mcp; health: /healthz, /readyz\n")
    if head.request.method != b"GET":
        return _closing(405, b"method not allowed: GET only\n", (b"allow", b"GET"))
    if path == HEALTHZ:
        return _closing(200, b"ok")
    reason = await readiness()
    if reason is not None:
        return _closing(503, reason.encode())
    return _closing(200, b"ok")


def _closing(
    status: int, body: bytes, *extra: tuple[bytes, bytes], content_type: bytes = TEXT_PLAIN
) -> Response:
    return Response(status, body, content_type, extra=((b"connection", b"close"), *extra))
