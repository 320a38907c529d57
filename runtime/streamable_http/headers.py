"""What a Streamable HTTP request's headers say, and whether they agree with its body.

* ``MCP-Protocol-Version``: a version this server speaks, on every request that sends it
  (2025-11-25 transport spec, "Protocol Version Header": 400 otherwise);
* 2026-07-28: which requests are sessionless (:func:`is_modern`), and the "Server
  Validation" of the headers that mirror the body (``MCP-Protocol-Version``, ``Mcp-Method``,
  ``Mcp-Name``, the last base64-encoded when it is not plain ASCII), 400 with -32020
  (``HeaderMismatch``) when one is missing, malformed or different
  (modelcontextprotocol/modelcontextprotocol,
  ``docs/specification/2026-07-28/basic/transports/streamable-http.mdx``).
"""

from __future__ import annotations

import base64

import h11
import pydantic_core

from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import HeaderMismatch, UnsupportedProtocolVersion
from runtime.streamable_http.refusal import Refusal
from runtime.streamable_http.wire import header

__all__ = [
    "METHOD_HEADER",
    "NAME_HEADER",
    "VERSION_HEADER",
    "check_mirrored_headers",
    "check_version",
    "header_text",
    "is_modern",
    "renamed",
]

VERSION_HEADER = b"mcp-protocol-version"
METHOD_HEADER = b"mcp-method"
NAME_HEADER = b"mcp-name"


def check_version(request: h11.Request) -> None:
    """An ``MCP-Protocol-Version`` this server does not speak: 400 (spec, "Protocol Version
    Header"). Absent: the session's negotiated version applies."""
    value = header(request, VERSION_HEADER)
    if value is None:
        return
    version = value.decode("latin-1").strip()
    if version not in versions.SUPPORTED_VERSIONS:
        raise Refusal(
            400,
            UnsupportedProtocolVersion(version[:64], list(versions.SUPPORTED_VERSIONS)),
            kind="protocol version",
        )


def header_text(request: h11.Request, name: bytes) -> str:
    value = header(request, name)
    return value.decode("latin-1").strip() if value is not None else ""


def meta_version(message: jsonrpc.Inbound) -> object:
    params = getattr(message, "params", None) or {}
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get(versions.PROTOCOL_VERSION_META) if isinstance(meta, dict) else None


def is_modern(request: h11.Request, message: jsonrpc.Inbound) -> bool:
    """A sessionless 2026-07-28 request: it names a version in its ``_meta`` or in
    ``MCP-Protocol-Version`` that is not a handshake one, or it is the ``server/discover``
    probe (answered in every era)."""
    if isinstance(message, jsonrpc.Request) and message.method == "server/discover":
        return True
    header_version = header_text(request, VERSION_HEADER)
    if header_version and header_version not in versions.HANDSHAKE_VERSIONS:
        return True
    named = meta_version(message)
    return named is not None and named not in versions.HANDSHAKE_VERSIONS


#: Methods whose target is mirrored in ``Mcp-Name``, and the param that holds it.
_NAMED = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    # SEP-2663, "Streamable HTTP: Routing Headers": the client MUST set Mcp-Name to the task.
    "tasks/get": "taskId",
    "tasks/update": "taskId",
    "tasks/cancel": "taskId",
}


#: Methods whose missing ``Mcp-Name`` is let through (a different one is still refused).
#: SEP-2663 makes the header a client MUST on ``tasks/*``, but the extension's reference
#: client, fastmcp-tasks 4.1.4, omits it (its request models set no name parameter), and the
#: header only helps intermediaries route: this server holds no state per node that a
#: misrouted task request could miss (tasks are rows in the shared database). Refusing would
#: cut that client off for no safety gained.
_NAME_MAY_BE_MISSING = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})


def check_mirrored_headers(request: h11.Request, message: jsonrpc.Inbound) -> None:
    """The 2026-07-28 transport's "Server Validation": ``MCP-Protocol-Version`` equal to
    the ``_meta`` version, ``Mcp-Method`` to the method, ``Mcp-Name`` (base64 sentinel
    decoded) to the tool's name or the resource's URI. 400 with -32020 otherwise; 400 with
    -32022 for a version this server does not speak."""
    request_id = message.id if isinstance(message, jsonrpc.Request) else None
    method = getattr(message, "method", None)

    def mismatch(what: str) -> Refusal:
        return Refusal(
            400,
            HeaderMismatch(f"header mismatch: {what}"),
            request_id=request_id,
            kind="header mismatch",
        )

    for name in (VERSION_HEADER, METHOD_HEADER, NAME_HEADER):
        if sum(field == name for field, _ in request.headers) > 1:
            # An intermediary may have routed on another of them (or on them joined,
            # RFC 9110 section 5.3): which one the body must match is not knowable.
            raise mismatch(f"{name.decode()} is repeated")
    header_version = header_text(request, VERSION_HEADER)
    named = meta_version(message)
    if not header_version:
        raise mismatch("the MCP-Protocol-Version header is required")
    if named is not None and named != header_version:
        raise mismatch(
            f"MCP-Protocol-Version {header_version[:40]!r} differs from the body's "
            f"{str(named)[:40]!r}"
        )
    if header_version not in versions.MODERN_VERSIONS:
        raise Refusal(
            400,
            UnsupportedProtocolVersion(header_version[:64], list(versions.SUPPORTED_VERSIONS)),
            request_id=request_id,
            kind="protocol version",
        )
    if method is None:
        return  # a response: the revision has none from clients; taken and dropped
    mirrored = header_text(request, METHOD_HEADER)
    if not mirrored:
        raise mismatch("the Mcp-Method header is required")
    if mirrored != method:
        raise mismatch(f"Mcp-Method {mirrored[:60]!r} differs from the body's {method[:60]!r}")
    param = _NAMED.get(method)
    if param is None:
        return
    params = getattr(message, "params", None) or {}
    body_name = params.get(param)
    value = header(request, NAME_HEADER)
    if value is None:
        if body_name is None:
            return  # the body is malformed: the session says so (-32602)
        if method in _NAME_MAY_BE_MISSING:
            return
        raise mismatch("the Mcp-Name header is required for " + method)
    shown = decode_sentinel(value)
    if shown is None:
        raise mismatch("Mcp-Name is not a valid header value")
    if shown != header_form(body_name):
        raise mismatch(f"Mcp-Name {shown[:60]!r} differs from the body's {str(body_name)[:60]!r}")


def header_form(value: object) -> object:
    """A body value as a client mirrors it in a header (transport spec, "Value Encoding",
    "Type conversion"): a string as is, an integer in decimal, a boolean as ``true`` or
    ``false``. Any other value is returned as it is, and matches no header. A mirrored
    value of the wrong type passes here, to be refused by the method for what it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value


def decode_sentinel(value: bytes) -> str | None:
    """A mirrored value: plain visible ASCII, or ``=?base64?...?=`` (UTF-8 inside);
    ``None`` if malformed (transport spec, "Value Encoding")."""
    text = value.decode("latin-1")
    if text.startswith("=?base64?") and text.endswith("?="):
        try:
            return base64.b64decode(text[9:-2], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    if any(not (0x20 <= ord(char) <= 0x7E) and char != "\t" for char in text):
        return None
    return text.strip()


def renamed(message: jsonrpc.Request, request_id: jsonrpc.RequestId | None) -> str:
    """``message`` as one JSON-RPC frame, under ``request_id``."""
    frame: dict[str, object] = {"jsonrpc": "2.0", "id": request_id, "method": message.method}
    if message.params is not None:
        frame["params"] = message.params
    return pydantic_core.to_json(frame).decode()
