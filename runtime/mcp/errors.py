"""JSON-RPC errors as a hierarchy, so code raises a meaning and the wire gets the exact code.

A handler raises e.g. :class:`InvalidParams`; the session turns any :class:`RpcError` into one
error response with the same ``code``, ``message`` and ``data``. Anything that is not an
``RpcError`` is a bug and becomes :class:`InternalError` without leaking its text to the client.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError


class RpcError(Exception):
    """Base of every error that is answered to the client as a JSON-RPC error object."""

    code: ClassVar[int] = -32603

    def __init__(self, message: str, data: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ParseError(RpcError):
    """The frame is not valid JSON (answered with ``id: null``)."""

    code = -32700


class InvalidRequest(RpcError):
    """Valid JSON, but not a JSON-RPC 2.0 request, notification or response."""

    code = -32600


class SessionNotInitialized(InvalidRequest):
    """A request other than ``ping`` arrived before ``initialize``."""


class MethodNotFound(RpcError):
    """No such method (or not available in this session's protocol version)."""

    code = -32601


class InvalidParams(RpcError):
    """The method exists but its params do not match its schema."""

    code = -32602


def invalid_params(what: str, error: ValidationError, *, root: str = "params") -> InvalidParams:
    """-32602 naming every bad field of ``what`` (``root`` names a whole-object error)."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or root}: {item['msg']}"
        for item in error.errors()
    )
    return InvalidParams(f"invalid {what}: {problems}")


class InternalError(RpcError):
    """The server failed; the client did nothing wrong."""

    code = -32603


class ServerBusy(RpcError):
    """The session's mailbox is full; the request was not queued. Retry after ``data``."""

    code = -32000


class SessionRestarted(RpcError):
    """The session actor restarted while this request was in flight; it did not complete."""

    code = -32001


class UnsupportedProtocolVersion(RpcError):
    """2026-07-28: a request named a protocol version this server does not speak.

    ``data`` lists what we support, so the client can pick one and retry (the ``mcp`` 2.x
    client re-probes with a mutual version).
    """

    code = -32022

    def __init__(self, requested: str, supported: list[str]) -> None:
        super().__init__(
            f"unsupported protocol version {requested!r}; supported: {', '.join(supported)}",
            {"supported": supported, "requested": requested},
        )


class MissingRequiredClientCapability(RpcError):
    """2026-07-28: the request needs a capability the client did not declare in its
    ``_meta`` (``io.modelcontextprotocol/clientCapabilities``); ``data.requiredCapabilities``
    names it, in the shape of the client's capabilities (SEP-2663, "Capability
    Negotiation")."""

    code = -32021

    def __init__(self, message: str, required: dict[str, Any]) -> None:
        super().__init__(message, {"requiredCapabilities": required})


class HeaderMismatch(RpcError):
    """2026-07-28, Streamable HTTP: a mirrored header (``MCP-Protocol-Version``,
    ``Mcp-Method``, ``Mcp-Name``) is missing, malformed, or differs from the body (spec:
    ``basic/transports/streamable-http.mdx``, "Server Validation"); answered with 400."""

    code = -32020


class Unavailable(RpcError):
    """A resource the server needs (storage, an upstream) cannot take work now; retry later
    (``data.retryAfterMs``). Nothing was done for this request."""

    code = -32004


class LimitExceeded(RpcError):
    """A limit refused the request and waiting will not help (a session's token or cost quota
    is spent, a call larger than a minute's allowance). ``data.limit`` names it."""

    code = -32005
