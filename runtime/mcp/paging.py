"""Opaque list cursors. Clients must not interpret them; we must refuse ones we did not make."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import TypeVar

from runtime.mcp.errors import InvalidParams
from storage.untrusted import clip

T = TypeVar("T")
_PREFIX = "exai:v1:"
_OFFSET = re.compile(r"[0-9]{1,18}")


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidParams(
            f"invalid cursor {_shown(cursor)!r}: not one this server issued"
        ) from None
    digits = text[len(_PREFIX) :]
    # ASCII digits only (``str.isdigit`` admits "²", which ``int`` refuses), and no more than
    # an offset this server could have issued (a Postgres bigint takes 18 digits whole).
    if not text.startswith(_PREFIX) or _OFFSET.fullmatch(digits) is None:
        raise InvalidParams(f"invalid cursor {_shown(cursor)!r}: not one this server issued")
    return int(digits)


def page(items: Sequence[T], cursor: str | None, size: int) -> tuple[list[T], str | None]:
    """The page at ``cursor`` (``None``: the first) and the cursor of the next, if any."""
    offset = 0 if cursor is None else decode_cursor(cursor)
    if offset > len(items) or (cursor is not None and offset == 0):
        raise InvalidParams(f"invalid cursor {_shown(cursor or '')!r}: out of range")
    end = offset + size
    return list(items[offset:end]), encode_cursor(end) if end < len(items) else None


def _shown(cursor: str) -> str:
    """A client's cursor as an error message quotes it: clipped (it is the client's text,
    bounded only by the message size)."""
    return clip(cursor, 64)
