"""HTTP/1.1 responses over a trio stream, written with h11: the one place this project
writes HTTP, shared by the admin interface (:mod:`runtime.admin`) and the MCP port's
plain-HTTP answers (:mod:`runtime.http_dispatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

TEXT_PLAIN = b"text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response: status code, body, and the headers beyond the framing ones."""

    status: int
    body: bytes
    content_type: bytes = TEXT_PLAIN
    extra: tuple[tuple[bytes, bytes], ...] = ()


async def send_response(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    """Send ``response`` on ``conn``'s connection, framed by ``Content-Length``; the reason
    phrase is the standard one (RFC 9110 section 15). Responses are never cached
    (``Cache-Control: no-store``): each tells the state of the node at that moment."""
    try:
        reason = HTTPStatus(response.status).phrase.encode()
    except ValueError:
        reason = b""
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.extra,
    ]
    head = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    assert head is not None
    await stream.send_all(head)
    body = conn.send(h11.Data(data=response.body))
    if body:
        await stream.send_all(body)
    end = conn.send(h11.EndOfMessage())
    if end:
        await stream.send_all(end)
