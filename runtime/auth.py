"""Client authentication at the WebSocket handshake.

The token travels as ``Authorization: Bearer <token>`` or, because the official WebSocket
clients cannot set headers, as ``?token=<token>``. Comparison is constant-time. A missing or
wrong token is refused before the upgrade, so an unauthenticated peer never reaches a session.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def load_or_create_token(path: Path, configured: str | None) -> str:
    """The configured token, else the one in ``path``, else a new one written there (0600)."""
    if configured:
        return configured
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Created with 0600 from the first byte: no window where another user can read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def presented_token(target: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token a client presented: the ``Authorization`` header wins over the query."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    values = parse_qs(urlsplit(target).query).get("token")
    return values[0] if values else None


def token_matches(expected: str, presented: str | None) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
