"""What a Python HTTP client put on the wire, recorded by its HTTP library's response hook.

Shared by the Python Streamable HTTP client scripts in this folder (each runs in its own
environment: ``httpx`` for mcp 1.x, ``httpx2`` for mcp 2.x and fastmcp, whose request and
response objects have the same shape). :class:`WireLog` is passed as the ``response`` event hook
of the client's ``AsyncClient``; every exchange becomes one :class:`Exchange`-shaped dict in the
script's JSON report, so the test can assert what the client sent (method, the JSON-RPC method
of a POST, the MCP headers) and what it got (status, content type, the session id minted).
"""

from __future__ import annotations

import json
from typing import Any, Protocol


class Headers(Protocol):
    def get(self, key: str, default: str | None = None) -> str | None: ...


class Request(Protocol):
    method: str
    headers: Headers

    @property
    def content(self) -> bytes: ...


class Response(Protocol):
    status_code: int
    headers: Headers

    @property
    def request(self) -> Request: ...


def rpc_of(body: bytes) -> tuple[str | None, dict[str, Any]]:
    """The JSON-RPC method of a POST body (``"response"`` for a client's response, else None)
    and its ``params._meta`` (empty when absent)."""
    try:
        message = json.loads(body)
    except ValueError:
        return None, {}
    if not isinstance(message, dict):
        return None, {}
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    method = message.get("method")
    if isinstance(method, str):
        return method, meta
    return ("response" if "id" in message else None), meta


def body(request: Request) -> bytes:
    """The request's body; empty if it was streamed (the MCP clients send bytes they built)."""
    try:
        return request.content
    except Exception:  # the library's RequestNotRead: a streamed body is not kept
        return b""


class WireLog:
    """The exchanges, in the order their response heads arrived."""

    def __init__(self) -> None:
        self.exchanges: list[dict[str, Any]] = []

    async def __call__(self, response: Response) -> None:
        request = response.request
        authorization = request.headers.get("authorization") or ""
        rpc, meta = rpc_of(body(request)) if request.method == "POST" else (None, {})
        self.exchanges.append(
            {
                "method": request.method,
                "rpc": rpc,
                "log_level_meta": meta.get("io.modelcontextprotocol/logLevel"),
                "session_id": request.headers.get("mcp-session-id"),
                "protocol_version": request.headers.get("mcp-protocol-version"),
                "accept": request.headers.get("accept"),
                "bearer": authorization.startswith("Bearer "),
                "status": response.status_code,
                "content_type": (response.headers.get("content-type") or "").split(";")[0],
                "minted_session_id": response.headers.get("mcp-session-id"),
            }
        )
