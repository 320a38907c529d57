"""Which ``Origin`` may reach the MCP endpoint: the defence against DNS rebinding.

A web page the user visits can make their browser send requests to ``http://127.0.0.1:PORT``
(or to a name the attacker re-points at it); the browser then sends the page's ``Origin``.
MCP requires servers to "validate the ``Origin`` header on all incoming connections to
prevent DNS rebinding attacks" and, "if the ``Origin`` header is present and invalid",
to answer 403 Forbidden (modelcontextprotocol/modelcontextprotocol,
``docs/specification/2025-11-25/basic/transports.mdx``, "Security Warning"). A WebSocket
handshake gets the same check (a browser sends ``Origin`` there too: RFC 6455 section 10.2).

Allowed: no ``Origin`` at all (every non-browser client: the SDKs, IDEs, curl), a loopback
origin (``localhost``, ``127.0.0.0/8``, ``::1``; any scheme and port: a page served by
the user's own machine), and the origins the operator lists (``EXAI_ALLOWED_ORIGINS``,
compared exactly after normalising case and default ports). ``Origin: null`` (a sandboxed
or file page) is refused unless listed as ``null``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["OriginPolicy"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _normalise(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port always given, or ``None`` if
    ``origin`` is not a serialised origin (RFC 6454 section 6.2)."""
    if origin == "null":
        return "null"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    if port is None:
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def _loopback(origin: str) -> bool:
    host = (urlsplit(origin).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 section 6.3
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    """Decides whether a request's ``Origin`` header may reach the endpoint."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        """``allowed``: extra origins (``https://app.example.com``, ``null``). Raises
        :class:`ValueError` naming the first one that is not an origin."""
        normalised: set[str] = set()
        for origin in allowed:
            value = _normalise(origin.strip())
            if value is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
            normalised.add(value)
        self._allowed = frozenset(normalised)

    @classmethod
    def parse(cls, text: str) -> OriginPolicy:
        """From a comma-separated list (``EXAI_ALLOWED_ORIGINS``; empty: loopback only)."""
        return cls(part for part in text.split(",") if part.strip())

    def admits(self, origin: bytes | None) -> bool:
        """Whether a request with this ``Origin`` header value (``None``: absent) may go on."""
        if origin is None:
            return True
        text = origin.decode("latin-1").strip()
        value = _normalise(text)
        if value is None:
            return False
        if value in self._allowed:
            return True
        return value != "null" and _loopback(text)
