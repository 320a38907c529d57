"""An HTTP error answer of the MCP endpoint: its status, its JSON-RPC error, its headers.

Every refusal of ``runtime.streamable_http`` is raised as a :class:`Refusal` where it is found
and answered in one place (``endpoint``): the status the spec names, a body that is a
JSON-RPC error response (with the request's id when it is known, else ``null``: the spec's
MAY for transport errors), and ``kind``, under which it is logged at most once per period.
"""

from __future__ import annotations

from runtime.mcp import jsonrpc
from runtime.mcp.errors import RpcError

__all__ = ["RETRY_AFTER_S", "Refusal", "retry_after"]

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
