"""A WebSocket client connection as a :class:`~runtime.mcp.client.MessageStream`: MCP over
WebSocket, client side (one JSON-RPC message per text frame, subprotocol ``mcp``, as exai's
own server speaks it: ``runtime.websocket_transport``; SEP-1288's WebSocket transport).

:func:`open_ws_stream` connects (trio-websocket ``open_websocket_url``) with the configured
headers (``Authorization``, say), and closes on exit. Bounded: a message over
``max_message_bytes`` closes the connection (close code 1009) and breaks the stream.

A closed connection breaks the stream with :class:`~runtime.mcp.client.ServerGone` naming its
close code and reason (``receive`` raises it, so the proxied server's last error says why;
``send`` raises it too). A refused handshake (HTTP 401 for a wrong token, say) raises
:class:`ServerGone` from :func:`open_ws_stream`, naming the status and never the headers.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from runtime.mcp.client import ServerGone

__all__ = ["WebSocketStream", "open_ws_stream", "public_url"]

#: Seconds the opening and closing handshakes may take.
CONNECT_TIMEOUT = 30.0
DISCONNECT_TIMEOUT = 2.0
#: Messages received and not yet read: the reader takes them at once (ClientSession.run).
_QUEUE = 16


def public_url(url: str) -> str:
    """``url`` without its user info and query (either may hold a secret): for logs and
    errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class WebSocketStream:
    """The client's side of one WebSocket connection to an MCP server."""

    def __init__(
        self, ws: WebSocketConnection, *, name: str, url: str, max_message_bytes: int
    ) -> None:
        self.name = name
        self._where = public_url(url)
        self._ws = ws
        self._max = max_message_bytes

    async def send(self, message: str) -> None:
        try:
            await self._ws.send_message(message)
        except ConnectionClosed as closed:
            raise ServerGone(self._closed(closed)) from None

    async def receive(self) -> str | None:
        try:
            frame = await self._ws.get_message()
        except ConnectionClosed as closed:
            raise ServerGone(self._closed(closed)) from None
        if isinstance(frame, bytes):
            # MCP messages are UTF-8 JSON text; a binary frame is decoded the same way.
            return frame.decode("utf-8", errors="replace")
        return frame

    def _closed(self, closed: ConnectionClosed) -> str:
        reason = closed.reason
        code = reason.code if reason is not None else None
        if code == 1009:
            return (
                f"{self.name} sent a message longer than {self._max} bytes (EXAI_MAX_MESSAGE_BYTES)"
            )
        why = f": {reason.reason[:200]}" if reason is not None and reason.reason else ""
        return f"the WebSocket connection to {self._where} closed ({code}{why})"


@asynccontextmanager
async def open_ws_stream(
    url: str,
    headers: Mapping[str, str],
    *,
    name: str,
    max_message_bytes: int,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[WebSocketStream]:
    """Connect to ``url`` (``ws://`` or ``wss://``, system CA store) with ``headers`` and
    subprotocol ``mcp``; yield the stream; close the connection on exit (at most 2 s).

    Raises :class:`ServerGone` if the connection cannot be made (refused, a handshake
    answered with an HTTP status, no answer in ``connect_timeout`` seconds).
    """
    where = public_url(url)
    context = ssl.create_default_context() if url.startswith("wss://") else None
    async with AsyncExitStack() as stack:
        try:
            ws = await stack.enter_async_context(
                open_websocket_url(
                    url,
                    context,
                    subprotocols=["mcp"],
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                    message_queue_size=_QUEUE,
                    max_message_size=max_message_bytes,
                    connect_timeout=connect_timeout,
                    disconnect_timeout=DISCONNECT_TIMEOUT,
                )
            )
        except ConnectionRejected as rejected:
            raise ServerGone(
                f"{where} refused the WebSocket handshake with HTTP {rejected.status_code}"
            ) from None
        except HandshakeError as failed:
            # A connection that cannot be made is an OSError under the HandshakeError;
            # a ConnectionTimeout is named by its type. Never quoting the headers.
            cause = failed.__cause__
            if isinstance(cause, OSError):
                raise ServerGone(f"cannot connect to {where}: {cause.strerror or cause}") from None
            raise ServerGone(f"the WebSocket to {where} failed: {type(failed).__name__}") from None
        except OSError as failed:
            raise ServerGone(f"cannot connect to {where}: {failed.strerror or failed}") from None
        yield WebSocketStream(ws, name=name, url=url, max_message_bytes=max_message_bytes)
