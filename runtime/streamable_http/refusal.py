"""An HTTP error answer of the MCP endpoint: its status, its JSON-RPC error, its headers.

Every refusal of ``runtime.streamable_http`` is raised as a :class:`Refusal` where it is found
and answered in one place (``endpoint``): the status the spec names, a body that is a
JSON-RPC error response (with the request's id when it is known, else ``null``: the spec's
MAY for transport errors), and ``kind``, under which it is logged at most once per period.
A request head that is not HTTP at all (:func:`bad_head`) is answered the same way, by
``runtime.http_dispatch``, since a client of the MCP port is an MCP client.
"""

from __future__ import annotations

from runtime.mcp import jsonrpc
from runtime.mcp.errors import InvalidRequest, RpcError

__all__ = ["BAD_HEAD", "RETRY_AFTER_S", "Refusal", "bad_head", "retry_after"]

#: The ``kind`` of a refused request head (h11 could not parse it).
BAD_HEAD = "bad request head"

#: Seconds a client is told to wait after a 503 or 429.
RETRY_AFTER_S = 1


def retry_after() -> tuple[tuple[bytes, bytes], ...]:
    """The ``Retry-After`` header of a 503 or 429 (RFC 9110 section 10.2.3)."""
    return ((b"retry-after", str(RETRY_AFTER_S).encode()),)


class Refusal(Exception):
    """An HTTP error answer: status, JSON-RPC error (``id`` when known), extra headers."""

    def __init__(
        self,
        status: int,
        error: RpcError,
        *,
        request_id: jsonrpc.RequestId | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        kind: str | None = None,
    ) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.request_id = request_id
        self.headers = headers
        self.kind = kind or f"{status}"

    def body(self) -> bytes:
        """The JSON-RPC error response the answer carries (``application/json``)."""
        return jsonrpc.encode_error(self.request_id, self.error).encode()


def bad_head(status: int, reason: str) -> Refusal:
    """A request head h11 refused (RFC 9112: garbage, a bad request line or header, or a
    head over the size bound): ``status`` is h11's hint (400, or 431 for a head too large,
    RFC 6585 section 5), ``reason`` its description (a fixed text of h11's, never the
    peer's bytes). The JSON-RPC error is -32600, Invalid Request, with ``id: null``: there
    is no message to take an id from, nor JSON to fail to parse (-32700)."""
    return Refusal(status, InvalidRequest(f"bad request: {reason}"), kind=BAD_HEAD)
