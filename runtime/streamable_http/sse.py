"""Server-Sent Events framing: one JSON-RPC message per event, comments as keep-alives.

The format is the WHATWG HTML standard's ``text/event-stream`` ("Server-sent events",
section 9.2.6 "Interpreting an event stream"): an event is ``data:`` lines ended by a blank
line. A JSON-RPC message as this project encodes it never contains a line break (compact JSON
escapes them inside strings), so each event is exactly one ``data:`` line. No ``id:`` field is
sent: this server does not offer resumption (``Last-Event-ID``), which MCP 2025-11-25 makes
optional and 2026-07-28 removed (``basic/transports``), so a client has no cursor to keep.

A comment (a line starting with ``:``) carries nothing and every client ignores it; sent
while a stream is quiet it keeps intermediaries and client read timeouts from closing it,
and lets the server learn that a peer has gone (the write fails).
"""

from __future__ import annotations

__all__ = ["EVENT_STREAM", "KEEPALIVE", "event"]

#: The media type of an SSE stream.
EVENT_STREAM = b"text/event-stream"
#: A comment line: nothing for the client, bytes on the wire for everyone in between.
KEEPALIVE = b":\n\n"


def event(message: str) -> bytes:
    """One ``message`` event carrying ``message`` (an encoded JSON-RPC message or batch).

    ``message`` must hold no line break (``ValueError``): the encoders of
    :mod:`runtime.mcp.jsonrpc` never produce one.
    """
    if "\n" in message or "\r" in message:
        raise ValueError("an SSE data line cannot hold a line break")
    return b"event: message\ndata: " + message.encode() + b"\n\n"
