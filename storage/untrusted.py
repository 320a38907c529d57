"""Text and JSON a client chose: bounded and made safe here, and nowhere else.

Client-chosen strings (``clientInfo``, request ids, tool results, method names) reach logs, the
journal, the database, ``exai status`` and terminals. Each of those places uses these helpers:

* :func:`clip` bounds a text to a number of characters, with a marker saying it was cut and
  how long it really was (``…[truncated, 4194304 chars]``), so a reader never mistakes a cut
  value for the whole one;
* :func:`printable` (:func:`printable_block` for tracebacks) escapes what a terminal would
  obey instead of print (C0 and C1 control characters, so also ESC sequences, DEL, line and
  paragraph separators, bidi overrides), so a value can neither retitle the window, clear the
  screen nor start a forged line;
* :func:`storable_text` and :func:`storable` replace U+0000, which PostgreSQL text and jsonb
  cannot hold;
* :func:`bounded_json` bounds a JSON value's serialized size for storage, replacing a value
  too large by a small object that keeps its beginning and says its real size.

It lives in ``storage`` because storage is the bottom layer: ``runtime`` and ``actors`` may
import it, and storage itself needs it for rows and stored results (docs/architecture.md).
Pure functions, no dependency beyond pydantic-core.
"""

from __future__ import annotations

from typing import Final

import pydantic_core
from pydantic import JsonValue

#: Longest client-chosen name or version kept (``clientInfo`` fields), in characters.
NAME_CHARS: Final = 256
#: Longest JSON-RPC id accepted, in bytes of its JSON text: ids are echoed exactly, so a
#: longer one is refused rather than cut.
ID_BYTES: Final = 256


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters; else its first ``limit`` characters
    followed by ``…[truncated, N chars]`` (``N``: the real length)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[truncated, {len(text)} chars]"


def clip_bytes(text: str, limit: int) -> str:
    """``text`` if its UTF-8 form has at most ``limit`` bytes; else cut at a character
    boundary so that the cut part is at most ``limit`` bytes, followed by
    ``…[truncated, N bytes]`` (``N``: the real UTF-8 size)."""
    if len(text) <= limit // 4:
        return text  # cannot exceed: a character is at most 4 bytes
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", "ignore")  # drops a character cut in two
    return f"{head}…[truncated, {len(data)} bytes]"


def _escape(code: int) -> str:
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code)
    if named is not None:
        return named
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


_CONTROLS: Final = (
    *range(0x00, 0x20),  # C0: ESC, BEL, CR, LF, TAB...
    0x7F,  # DEL
    *range(0x80, 0xA0),  # C1: CSI, OSC, NEL... (single-character ESC sequences)
    0x061C,  # Arabic letter mark
    0x200E,  # left-to-right and right-to-left marks
    0x200F,
    *range(0x202A, 0x202F),  # bidi embeddings and overrides (LRE..RLO)
    *range(0x2066, 0x206A),  # bidi isolates (LRI..PDI)
    0x2028,  # line and paragraph separators
    0x2029,
)
_ESCAPES: Final = {code: _escape(code) for code in _CONTROLS}
_ESCAPES_KEEP_NEWLINES: Final = {code: text for code, text in _ESCAPES.items() if code != 0x0A}


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape (``\\x1b``,
    ``\\u202e``, ``\\n``), so it prints on one line.

    Backslashes are kept: an escape that was typed is as harmless as one made here.
    """
    return text.translate(_ESCAPES)


def printable_block(text: str, indent: str = "    ") -> str:
    """``text`` as lines (a traceback): escaped as :func:`printable` but for ``\\n``, and every
    line indented, so that none of it can pass for a line of its own (a forged log line in an
    exception message stays inside the indented block)."""
    lines = text.translate(_ESCAPES_KEEP_NEWLINES).split("\n")
    return "\n".join(indent + line for line in lines)


def storable_text(text: str) -> str:
    """``text`` with U+0000 replaced by U+FFFD (the replacement character): PostgreSQL text and
    jsonb cannot hold it, and clients can send it, so the row is stored rather than refused."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


#: Lists and objects nested in a stored JSON value, at most: pydantic's serializer refuses
#: deeper (its recursion guard, 255 levels, counts the record and the field holding the value
#: too), so a record holding a deeper one could be validated but not written to the journal,
#: and its whole append would fail. pydantic's ``JsonValue`` validation refused from 255.
MAX_JSON_DEPTH = 253


def storable(value: object) -> JsonValue:
    """``value``, a JSON value as pydantic's ``JsonValue`` takes one (``list``, ``dict`` with
    ``str`` keys, ``str``, ``bool``, ``int``, ``float``, ``None``, nested; a subclass, such as
    a ``StrEnum`` member, as its base type), with :func:`storable_text` applied everywhere
    (strings, keys, nested). ``ValueError`` if it is not one, or if its lists and objects nest
    more than :data:`MAX_JSON_DEPTH` deep.

    The validator of stored client JSON (``storage.rows.ClientJson``): one walk that both
    checks and makes storable, instead of pydantic's ``JsonValue`` validation (a Python
    discriminator per node) and a walk after it, for every call's result (issue 17)."""
    try:
        return _storable(value, MAX_JSON_DEPTH)
    except RecursionError:  # a caller's stack already deep: refused, as too deep
        raise ValueError("not a JSON value: nested too deeply") from None


def _storable(value: object, room: int) -> JsonValue:
    """``room``: how many more lists and objects may nest here."""
    kind = type(value)
    # The exact types first: all a result built from JSON holds.
    if kind is str:
        return storable_text(value)  # type: ignore[arg-type]
    if kind in _SCALARS:
        return value  # type: ignore[return-value]
    # Containers, exact or subclasses (an OrderedDict is stored as a dict).
    if isinstance(value, dict):
        if not room:
            raise _too_deep()
        room -= 1
        return {
            _storable_key(k): v if type(v) in _SCALARS else _storable(v, room)
            for k, v in value.items()
        }
    if isinstance(value, list):
        if not room:
            raise _too_deep()
        room -= 1
        return [item if type(item) in _SCALARS else _storable(item, room) for item in value]
    # Subclasses of the scalars (a StrEnum or IntEnum member) as their base type.
    if isinstance(value, str):
        return storable_text(str.__str__(value))
    if isinstance(value, int):  # bool has no subclasses
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise ValueError(f"not a JSON value: {kind.__name__}")


#: The exact types stored as they are: inline in a list's or an object's walk, no call each
#: (the depth passed down made each call dearer).
_SCALARS = frozenset({int, float, bool, type(None)})


def _too_deep() -> ValueError:
    return ValueError(f"not a JSON value: lists and objects nested more than {MAX_JSON_DEPTH} deep")


def _storable_key(key: object) -> str:
    if type(key) is str:
        return storable_text(key)
    if isinstance(key, str):
        return storable_text(str.__str__(key))
    raise ValueError(f"not a JSON object key: {type(key).__name__}")


def json_size(value: JsonValue) -> int:
    """Bytes of ``value`` as compact JSON."""
    return len(pydantic_core.to_json(value))


def bounded_json(value: JsonValue, max_bytes: int, *, size: int | None = None) -> JsonValue:
    """``value`` if its compact JSON is at most ``max_bytes``; else an object saying so::

        {"truncated": true, "size_bytes": 4194400, "max_bytes": 1048576,
         "json_prefix": "{\\"content\\":[{\\"text\\":\\"aa…[truncated, 4194400 bytes]"}

    whose own JSON is at most ``max_bytes`` (``max_bytes`` of at least 256). The prefix is the
    beginning of the value's JSON text, so what was stored can still be recognised.

    ``size``: the bytes of the value's compact JSON if the caller has encoded it already
    (a tool's result, encoded for its reply), so that a value within the bound is not
    encoded again.
    """
    if size is not None and size <= max_bytes:
        return value
    encoded = pydantic_core.to_json(value)
    if len(encoded) <= max_bytes:
        return value
    text = encoded.decode()
    budget = max_bytes - 160  # the envelope and the marker
    while True:
        bounded: JsonValue = {
            "truncated": True,
            "size_bytes": len(encoded),
            "max_bytes": max_bytes,
            "json_prefix": clip_bytes(text, max(budget, 0)),
        }
        size = json_size(bounded)
        if size <= max_bytes or budget <= 0:
            return bounded
        # The prefix grew when escaped (quotes, backslashes, control characters): shrink it
        # by what it overshot, and a little more so that this ends in a step or two.
        budget -= size - max_bytes + 16
