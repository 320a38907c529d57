"""Finding an owner's threads by the words of their messages (the ``threads`` tool's ``query``).

Two ways to match, chosen by the query's script:

* **full-text search**, PostgreSQL's ``simple`` configuration (lower-cased words, no stemming,
  no stop words: it tokenizes any script that separates words with spaces or punctuation,
  where ``english`` would stem and drop words). The query is the client's text handed to
  ``websearch_to_tsquery`` as a parameter, which never fails on syntax: ``"a phrase"``,
  ``or``, ``-word`` mean what they mean to a web search engine, anything else is a word. The
  GIN index ``messages_search_idx`` (db/migrations/20261201000200_messages_search.sql) serves
  it; the expression here must stay identical to the index's or the index is not used.
* **substring search** when the query holds a CJK character (Han, kana, Hangul). The parser of
  every text search configuration reads a run of CJK characters without spaces as *one* word
  (``'我喜欢机器学习'``), so ``机器学习`` would never match a sentence that contains it. Each
  whitespace-separated term must then occur in the message (``ILIKE`` with ``%``, ``_`` and
  ``\\`` escaped, the terms passed as a parameter). No index serves it (``pg_trgm`` would, but
  a migration that needs an extension fails where the role may not create one, and Supabase
  keeps extensions in a schema of its own): it reads the caller's own messages, found through
  ``threads_owner_idx`` and ``messages_thread_idx``, bounded by the read pool's
  ``statement_timeout``.

Only a thread's prompts and answers are searched (role ``user`` or ``assistant``, not the
copies of files a turn sent, ``tool_name = 'file'``), and of each message its first
:data:`SEARCH_CHARS` characters: a ``tsvector`` holds at most 1 MiB of lexemes, and indexing a
longer text would make the message's insert fail.

Results are the threads, newest activity first (``updated_at`` then ``id``, descending: the
listing's keyset, so a listing cursor and a search cursor are the same kind of position), each
with a snippet of its newest matching message. Every statement is one read of the node's read
pool (:mod:`storage.read_pool`), the text always a parameter, never part of the SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from storage.errors import InvalidInput

#: Characters of a message that are searched (and indexed). Must equal the migration's
#: ``left(content, 50000)``. The most measured on PostgreSQL 18 (hyphenated words, indexed
#: whole and in parts) is about 10.5 bytes of ``tsvector`` per character, so 50,000
#: characters stay far below the 1 MiB of lexemes a ``tsvector`` may hold
#: (tests/test_threads_search.py stores a message whose whole text would not fit).
SEARCH_CHARS: Final = 50_000
#: Longest query, in characters and in UTF-8 bytes (a CJK character is 3 bytes, an emoji 4).
QUERY_CHARS: Final = 256
QUERY_BYTES: Final = 512
#: Most whitespace-separated terms of a substring (CJK) query.
MAX_TERMS: Final = 8
#: Longest snippet and title returned, in characters.
SNIPPET_CHARS: Final = 240
TITLE_CHARS: Final = 200
#: How a snippet marks a matched word.
MARK_START: Final = "«"
MARK_STOP: Final = "»"

_CJK = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)
#: A message that is searched: a prompt or an answer, not a file copy.
_SEARCHED = "m.role in ('user', 'assistant') and m.tool_name is distinct from 'file'"
_TSVECTOR = f"to_tsvector('simple', left(m.content, {SEARCH_CHARS}))"
_TSQUERY = "websearch_to_tsquery('simple', %(query)s)"
#: ts_headline's options: constants, never the client's text.
_HEADLINE_OPTIONS = (
    "MaxWords=30, MinWords=10, ShortWord=0, MaxFragments=2, "
    f'FragmentDelimiter=" … ", StartSel={MARK_START}, StopSel={MARK_STOP}'
)
_MATCH = {
    "words": f"{_TSVECTOR} @@ {_TSQUERY}",
    "substring": f"left(m.content, {SEARCH_CHARS}) ilike all (%(patterns)s)",
}
#: The snippet: ts_headline of the first SEARCH_CHARS characters; for a substring query,
#: the text around the first term's first occurrence (marked afterwards, in Python).
_SNIPPET = {
    "words": (
        f"ts_headline('simple', left(m.content, {SEARCH_CHARS}), {_TSQUERY}, '{_HEADLINE_OPTIONS}')"
    ),
    "substring": (
        f"substr(m.content, greatest(1, strpos(lower(left(m.content, {SEARCH_CHARS})),"
        f" lower(%(first)s)) - {SNIPPET_CHARS // 3}), {SNIPPET_CHARS * 2})"
    ),
}

Mode = Literal["words", "substring"]


class InvalidSearchQuery(InvalidInput, ValueError):
    """A search query out of bounds or with nothing to search for."""


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A checked query: ``text`` as the client wrote it, and how it is matched."""

    text: str
    mode: Mode
    terms: tuple[str, ...]  # substring mode: the terms, each to occur; words mode: ()


class ThreadHit(BaseModel):
    """A thread that matched, with a snippet of its newest matching message: the fields of
    :class:`storage.threads.ThreadSummary` (which imports this module), and ``snippet``."""

    model_config = ConfigDict(frozen=True)

    thread_id: UUID
    title: str | None
    turn_count: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    prompt_tokens_estimated: int | None = None
    prompt_tokens_reported: int | None = None
    token_ratio: float | None = None
    snippet: str


class SearchPage(BaseModel):
    model_config = ConfigDict(frozen=True)

    threads: list[ThreadHit]
    next_cursor: str | None


def parse_query(text: str) -> SearchQuery:
    """Check ``text`` and choose its mode. Raises :class:`InvalidSearchQuery` naming the bound
    that was passed (the client's text is never echoed: it may be large)."""
    if len(text) > QUERY_CHARS:
        raise InvalidSearchQuery(f"query too long: {len(text)} characters, at most {QUERY_CHARS}")
    if "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise InvalidSearchQuery("query holds U+0000 or an unpaired surrogate, which no text has")
    size = len(text.encode("utf-8"))
    if size > QUERY_BYTES:
        raise InvalidSearchQuery(f"query too long: {size} bytes in UTF-8, at most {QUERY_BYTES}")
    if not any(c.isalnum() for c in text):
        raise InvalidSearchQuery("query has no letter or digit to search for")
    if _CJK.search(text) is None:
        return SearchQuery(text=text, mode="words", terms=())
    terms = tuple(dict.fromkeys(term for term in text.split() if any(c.isalnum() for c in term)))
    if len(terms) > MAX_TERMS:
        raise InvalidSearchQuery(
            f"query has {len(terms)} terms; a query with CJK characters takes at most {MAX_TERMS}"
        )
    return SearchQuery(text=text, mode="substring", terms=terms)


Read = Callable[[str, Mapping[str, Any]], list[dict[str, Any]]]


def search_owned(
    read: Read,
    owner_id: UUID,
    query: SearchQuery,
    *,
    limit: int,
    position: tuple[datetime, UUID] | None,
    live_at: datetime | None,
) -> tuple[list[ThreadHit], bool]:
    """The owner's threads matching ``query`` after keyset ``position`` (the last one shown:
    ``(updated_at, id)``), newest first: at most ``limit`` of them, and whether more follow.
    ``live_at``: only threads not expired at that time. ``read`` runs one statement."""
    where = ["t.owner_id = %(owner)s"]
    params: dict[str, Any] = {"owner": owner_id, "limit": limit + 1}
    if live_at is not None:
        where.append("t.expires_at > %(live_at)s")
        params["live_at"] = live_at
    if position is not None:
        where.append("(t.updated_at, t.id) < (%(after_at)s, %(after_id)s)")
        params["after_at"], params["after_id"] = position
    if query.mode == "words":
        params["query"] = query.text
    else:
        params["patterns"] = [f"%{_like_escape(term)}%" for term in query.terms]
        params["first"] = query.terms[0]
    matching = (
        f"select {{what}} from messages m where m.thread_id = {{thread}} and {_SEARCHED}"
        f" and {_MATCH[query.mode]}"
    )
    # Threads first (a semi-join the planner may drive from the GIN index or from the owner's
    # threads), then one snippet per thread of the page only: ts_headline re-parses the text.
    sql = (
        "with hits as ("
        f" select t.id as thread_id, left(t.title, {TITLE_CHARS}) as title, t.turn_count,"
        " t.created_at, t.updated_at, t.expires_at, t.prompt_tokens_estimated,"
        " t.prompt_tokens_reported, t.token_ratio from threads t"
        f" where {' and '.join(where)}"
        f" and exists ({matching.format(what='1', thread='t.id')})"
        " order by t.updated_at desc, t.id desc limit %(limit)s)"
        " select hits.*, newest.snippet from hits cross join lateral ("
        f"{matching.format(what=_SNIPPET[query.mode] + ' as snippet', thread='hits.thread_id')}"
        " order by m.created_at desc, m.id desc limit 1) newest"
        " order by hits.updated_at desc, hits.thread_id desc"
    )
    rows = read(sql, params)
    hits = [
        ThreadHit(**{**row, "snippet": _snippet(row["snippet"], query)}) for row in rows[:limit]
    ]
    return hits, len(rows) > limit


def _like_escape(term: str) -> str:
    """``term`` matched literally by ``LIKE``/``ILIKE`` (whose default escape is ``\\``)."""
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _snippet(text: str, query: SearchQuery) -> str:
    """One line of at most :data:`SNIPPET_CHARS` characters (``…`` where it was cut); a
    substring query's first term marked as ``ts_headline`` marks words."""
    line = " ".join(text.split())
    if query.mode == "substring":
        # Matched in the line itself, case-insensitively: not by find() in line.lower(),
        # whose indexes are not the line's where lowering changes a length (U+0130, "İ",
        # lowers to two characters, and the mark would land that far off the match).
        found = re.search(re.escape(query.terms[0]), line, re.IGNORECASE)
        if found is not None:
            at, end = found.span()
            start = max(0, at - SNIPPET_CHARS // 3)
            line = (
                "…" if start else ""
            ) + f"{line[start:at]}{MARK_START}{line[at:end]}{MARK_STOP}{line[end:]}"
    return line if len(line) <= SNIPPET_CHARS else line[: SNIPPET_CHARS - 1] + "…"
