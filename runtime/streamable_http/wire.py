"""HTTP/1.1 on one connection, with h11: request bodies read within bounds, responses written
whole (``Content-Length``) or streamed (SSE, chunked), and the next request on a kept-alive
connection.

h11 does the framing (RFC 9112): no HTTP is parsed or written by hand here. Every read is
bounded: a head by h11's ``max_incomplete_event_size`` (16 KiB), a body by the caller's byte
limit (a ``Content-Length`` over it is refused before a byte of the body is read) and, in
time, by the caller's deadline; what a client sends while its response is being written
(pipelining) is kept for h11 up to :data:`MAX_EARLY_BYTES`, after which it is left in the
socket (TCP back-pressure).

Cancellation: cancelling a write leaves the connection in an unknown state; the caller
then closes it (:attr:`HttpWire.broken`).
"""

from __future__ import annotations

import contextlib
from http import HTTPStatus

import h11
import trio

from runtime.http_dispatch import BadRequest, refuse_head
from runtime.listener import PeerStream

__all__ = ["BodyTooLarge", "HttpWire", "PeerGone"]

#: Bytes asked of the socket per read.
RECEIVE_BYTES = 65536
#: Bytes of a following request kept while a response is written.
MAX_EARLY_BYTES = 65536


class BodyTooLarge(Exception):
    """The request's body is over the limit (413)."""


class PeerGone(Exception):
    """The peer closed or reset the connection."""


class HttpWire:
    """One HTTP/1.1 connection, server side, over a :class:`PeerStream`.

    ``conn`` is the h11 connection whose current request head the caller has already
    read (``runtime.http_dispatch.read_request_head``).
    """

    def __init__(self, stream: PeerStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        #: Set when the connection can serve no further request: a write was cut, the peer
        #: went away, or a response was sent before the request's body was read.
        self.broken = False
        self._early = 0

    # -- reading -----------------------------------------------------------------------------

    async def read_body(self, request: h11.Request, limit: int) -> bytes:
        """The whole body of ``request`` (at most ``limit`` bytes). Raises
        :class:`BodyTooLarge`, :class:`PeerGone`, or h11's ``RemoteProtocolError`` for a
        malformed body (bad chunking)."""
        declared = _content_length(request)
        if declared is not None and declared > limit:
            raise BodyTooLarge
        if self.conn.they_are_waiting_for_100_continue:
            # RFC 9110 section 10.1.1: a server that will read the content "MUST" send "an
            # immediate 100 (Continue) response" (curl waits for it on every body over
            # 1 MiB); a body over the limit was refused above, with its final status.
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await self._receive()
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise BodyTooLarge
                continue
            if isinstance(event, h11.EndOfMessage):
                return bytes(body)
            raise PeerGone  # ConnectionClosed: the peer left mid-body

    async def next_request(self) -> h11.Request | None:
        """After a response: the next request's head on this connection, or ``None`` if it
        cannot serve another (closed by either side, or broken). A head h11 refuses is
        answered as the first request's would be (its status, a JSON-RPC error:
        :func:`runtime.http_dispatch.refuse_head`), then ``None``. The caller bounds the wait
        (the keep-alive idle timeout)."""
        if self.broken or self.conn.our_state is not h11.DONE:
            return None
        if self.conn.their_state is not h11.DONE:
            return None
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            return None
        self._early = 0
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.broken = True
                await refuse_head(
                    self.stream, BadRequest(self.conn, exc.error_status_hint, str(exc))
                )
                return None
            if event is h11.NEED_DATA:
                try:
                    await self._receive()
                except PeerGone:
                    return None
                continue
            if isinstance(event, h11.Request):
                return event
            return None

    async def _receive(self) -> None:
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            raise PeerGone from None
        if not data:
            self.broken = True
            raise PeerGone
        self.conn.receive_data(data)

    async def watch_peer(self) -> None:
        """Return when the peer goes away (end of stream or reset), while a response is
        being produced; what it sends meanwhile is kept for the next request, up to
        :data:`MAX_EARLY_BYTES` (then this waits for :attr:`PeerStream.ended` only)."""
        while self._early < MAX_EARLY_BYTES:
            try:
                # Waited for first: a peer rarely sends while it waits for its response, so
                # a read tried at once would nearly always fail, a system call per request.
                await self.stream.wait_readable()
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.broken = True
                return
            self._early += len(data)
            self.conn.receive_data(data)
        await self.stream.ended.wait()
        self.broken = True

    # -- writing -----------------------------------------------------------------------------

    async def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes | None,
        headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = (),
        close: bool = False,
    ) -> None:
        """A whole response (``Content-Length``). ``close``: ask the client to close, and
        serve nothing more here (a request whose body was not read, say)."""
        fields = [(b"content-length", str(len(body)).encode()), *headers]
        if content_type is not None:
            fields.insert(0, (b"content-type", content_type))
        if close or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            # A body we did not read stays in the socket: this connection cannot go on.
            fields.append((b"connection", b"close"))
            self.broken = True
        # Framed whole, then written at once: one system call for a small response, not
        # three (its head, its body, its end), and one wake of the peer.
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=fields, reason=_reason(status))
        ]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        chunks: list[bytes] = []
        for event in events:
            chunks += self.conn.send_with_data_passthrough(event) or ()
        await self._write(b"".join(chunks))

    async def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The head of a streamed response (no length: chunked on HTTP/1.1)."""
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))

    async def send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        await self._send(h11.EndOfMessage())

    async def _send(self, event: h11.Event) -> None:
        await self._write(self.conn.send(event))

    async def _write(self, data: bytes | None) -> None:
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            raise PeerGone from None
        except BaseException:
            self.broken = True  # cut mid-write: the framing on the wire is unknown
            raise

    async def close(self) -> None:
        """Close the socket (idempotent; never raises)."""
        self.broken = True
        with contextlib.suppress(Exception):
            await trio.aclose_forcefully(self.stream)


def header(request: h11.Request, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case), the first if repeated; ``None`` if absent."""
    for field, value in request.headers:
        if field == name:
            return bytes(value)
    return None


def _content_length(request: h11.Request) -> int | None:
    value = header(request, b"content-length")
    return int(value) if value is not None else None  # h11 has checked it is digits


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
