"""Client authentication at the WebSocket handshake, and who the client is.

The token travels as ``Authorization: Bearer <token>`` or, because the official WebSocket
clients cannot set headers, as ``?token=<token>``. A missing or wrong token is refused before
the upgrade, so an unauthenticated peer never reaches a session.

Every token names a **client identity**: the node's own token (``<state-dir>/token`` or
``EXAI_TOKEN``) is the identity ``default``; named tokens come from the config file's
``[clients]`` table or ``EXAI_CLIENT_TOKENS`` (see :mod:`runtime.config`), each as the token or
as its SHA-256 digest (so a config file can name clients without holding a secret). What a
client owns (conversation threads) belongs to its identity, not to its connection, so it is the
same after a reconnect or a restart. Only digests are kept: the presented token is hashed once
and compared, in constant time, with *every* known digest, so neither the answer's timing nor
its early exit tells which one came close.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DEFAULT_IDENTITY = "default"
#: Generated tokens start with it.
TOKEN_PREFIX = "exai_"
MIN_TOKEN_LENGTH = 16
#: Names appear in logs and in the database: short, printable, no separators of our formats.
IDENTITY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True, slots=True)
class TokenDigest:
    """A client token known only by its SHA-256 digest (64 hex digits)."""

    sha256_hex: str

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256_hex)


def token_digest(token: str) -> bytes:
    """The SHA-256 digest of a token, as stored and compared."""
    return hashlib.sha256(token.encode()).digest()


def load_or_create_token(path: Path, configured: str | None) -> str:
    """The configured token, else the one in ``path``, else a new one written there (0600)."""
    if configured:
        return configured
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    # A prefix that secret scanners can recognise, and which keeps a token from starting
    # with "-" (base64url may), where a command line would take it for an option.
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
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


class ClientTokens:
    """Every token the node accepts, each naming one client identity."""

    def __init__(
        self, default_token: str, named: Mapping[str, str | TokenDigest] | None = None
    ) -> None:
        """Raise :class:`ValueError` (naming the identity, never quoting a token) if a name is
        malformed or reserved, a token is too short, or two identities share a token: a shared
        token could not say whose threads a caller may read."""
        digests: dict[str, bytes] = {DEFAULT_IDENTITY: token_digest(default_token)}
        for name, token in (named or {}).items():
            if name == DEFAULT_IDENTITY:
                raise ValueError(
                    f"client {name!r} is reserved for the node's own token "
                    "(<state-dir>/token or EXAI_TOKEN); choose another name"
                )
            if not IDENTITY_PATTERN.match(name):
                raise ValueError(
                    f"client name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-', "
                    "starting with a letter or digit"
                )
            if isinstance(token, TokenDigest):
                digests[name] = token.digest
                continue
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(
                    f"the token of client {name!r} is shorter than {MIN_TOKEN_LENGTH} characters"
                )
            digests[name] = token_digest(token)
        seen: dict[bytes, str] = {}
        for name, digest in digests.items():
            other = seen.setdefault(digest, name)
            if other != name:
                raise ValueError(f"clients {other!r} and {name!r} have the same token")
        self._digests = list(digests.items())

    def adopt(self, other: ClientTokens) -> None:
        """Accept ``other``'s tokens instead of these from now on (a reload): handshakes
        check the set that is current when they run."""
        self._digests = other._digests

    @property
    def identities(self) -> list[str]:
        return [name for name, _ in self._digests]

    def identify(self, presented: str | None) -> str | None:
        """The identity whose token was presented, or ``None``."""
        if presented is None:
            return None
        candidate = token_digest(presented)
        found: str | None = None
        for name, digest in self._digests:
            # No early exit: every comparison runs, whichever token matches.
            if hmac.compare_digest(digest, candidate):
                found = name
        return found
